"""Markdown reports (study report, model card) as one self-contained HTML file: markdown-it-py
(CommonMark + tables) renders the text, a Jinja2 template wraps it, and images are embedded as data
URIs so the file can be mailed or archived alone. Raw HTML in the markdown is not passed through
(escaped), so text from data (file names, diagnoses) cannot inject markup."""

from __future__ import annotations

import base64
import html
import mimetypes
from pathlib import Path


def _inline_images(md, base: Path):
    """A renderer rule: <img> with the file's bytes as a data URI (missing files keep their path)."""
    default = md.renderer.rules.get("image")

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        src = token.attrGet("src") or ""
        path = base / src
        if src and not src.startswith(("data:", "http:", "https:")) and path.is_file():
            kind = mimetypes.guess_type(path.name)[0] or "image/png"
            token.attrSet("src", f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}")
        return default(tokens, idx, options, env) if default else renderer.renderToken(tokens, idx, options, env)

    md.add_render_rule("image", image)


def markdown_to_html(text: str, base: Path, title: str) -> str:
    """`text` (markdown) as a complete HTML document; images relative to `base` are embedded."""
    from jinja2 import Environment, PackageLoader, select_autoescape
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    _inline_images(md, Path(base))
    env = Environment(loader=PackageLoader("melanogan", "templates"), autoescape=select_autoescape(["html"]))
    from markupsafe import Markup

    return env.get_template("document.html").render(title=html.unescape(title), body=Markup(md.render(text)))
