"""`melanogan serve` in a child process, as deployed: for the benchmark and the browser test."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], log: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `melanogan serve ARGS` on a free localhost port (output appended to `log`) and wait until
    /health answers; returns the process and its base URL. Raises RuntimeError with the log's tail."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from melanogan.cli import main; main()", "serve", *args, "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"melanogan serve exited: {Path(log).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"melanogan serve did not start within {timeout:.0f} s: {Path(log).read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)
