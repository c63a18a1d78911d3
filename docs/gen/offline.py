"""An mkdocs hook that keeps the site offline: every page must load nothing from the network.

nbconvert's notebook template carries a MathJax `<script src>` (mkdocs.yml points it at an empty
`data:` URL) and a Mermaid loader that imports its library from a CDN when a notebook holds a
diagram; ours hold none, so the loader is removed. Any other page that would load a script,
stylesheet, font, image or frame from http(s) is reported as a warning, which fails
`mkdocs build --strict`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.hooks.offline")

MERMAID_LOADER = re.compile(
    r"<script type=\"module\">\s*document\.addEventListener\(\"DOMContentLoaded\", async \(\) => \{\s*"
    r"const diagrams = document\.querySelectorAll\(\"\.jp-Mermaid.*?</script>",
    re.DOTALL,
)
REMOTE = re.compile(
    r"<(?:script|img|iframe|source|audio|video)\b[^>]*\bsrc=[\"']?(https?:)?//"
    r"|<link\b[^>]*\bhref=[\"']?(https?:)?//[^>]*>"
    r"|@import\s+(url\()?[\"']?(https?:)?//"
    r"|import\([\"'](https?:)?//",
    re.IGNORECASE,
)


def remote_assets(html: str) -> list[str]:
    """The tags and imports of `html` that would fetch something from the network (a `<link>` to
    another site is fine when it is only a link: rel=canonical and the like carry no asset)."""
    found = []
    for match in REMOTE.finditer(html):
        text = match.group(0)
        if text.lower().startswith("<link") and not re.search(
            r"rel=[\"']?(stylesheet|preload|icon|modulepreload)", text
        ):
            continue
        found.append(text[:120])
    return found


def on_post_page(output: str, page: Any, config: Any) -> str:
    output = MERMAID_LOADER.sub("", output)
    for asset in remote_assets(output):
        log.warning(
            "page %s loads %s from the network; the site must build and read offline",
            page.file.src_uri,
            asset,
        )
    return output
