"""User-facing errors: the CLI prints their message (which names the file or value and what to do)."""


class MelanoganError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class DataError(MelanoganError):
    """A dataset file or folder is missing, malformed or inconsistent."""
