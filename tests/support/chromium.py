"""Render a report page in headless Chromium and read what it shows (DOM, links, screenshot pixels)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest


class Links(HTMLParser):
    """Every src/href attribute and every <img>'s src, with the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.images: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data", "poster"):
                self.refs.append(value or "")
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")


def parsed(html: str) -> Links:
    links = Links()
    links.feed(html)
    return links


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is missing; install it with: apt-get install chromium")
    return found


def browse(binary: str, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             "--no-first-run", "--user-data-dir=" + str(page.parent / ".chromium")]  # fmt: skip
    return subprocess.run(
        [binary, *flags, *args, page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def coloured_pixels(screenshot: Path) -> int:
    from matplotlib.image import imread

    pixels = imread(screenshot)[..., :3]
    return int(((pixels.max(axis=2) - pixels.min(axis=2)) > 0.25).sum())
