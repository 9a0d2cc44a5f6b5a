"""Real long texts to hide facts in: the King James Bible (Debian package `bible-kjv`) and the
Debian Reference manual (Debian package `debian-reference-en`, XHTML stripped to text by
lxml's HTML parser). Both are installed on the machine, never downloaded."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

HAYSTACKS = ("bible", "debian")
DEBIAN_REFERENCE = Path("/usr/share/debian-reference")
# The manual's parts in reading order: preface, chapters 1-12, appendix.
DEBIAN_PARTS = ["pr01", *(f"ch{i:02d}" for i in range(1, 13)), "apa"]
# Each block-level element of the manual becomes one line of text.
BLOCKS = ("p", "li", "dt", "dd", "pre", "h1", "h2", "h3", "h4", "td")
VERSE_REFERENCE = re.compile(r"^\S+?\d+:\d+ ", re.MULTILINE)


class HaystackMissing(RuntimeError):
    """A haystack's Debian package is not installed."""


def haystack_text(name: str) -> str:
    """The whole text of haystack `name` (one of HAYSTACKS), lines of prose."""
    if name == "bible":
        return bible_text()
    if name == "debian":
        return debian_reference_text()
    raise ValueError(f"haystack {name!r} is not one of {', '.join(HAYSTACKS)}")


@functools.cache
def bible_text() -> str:
    """Genesis to Revelation, one verse a line, without the verse references."""
    if shutil.which("bible") is None:
        raise HaystackMissing("the King James Bible needs the bible-kjv package: apt-get install bible-kjv")
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True)
    return VERSE_REFERENCE.sub("", out.stdout)


@functools.cache
def debian_reference_text(root: Path = DEBIAN_REFERENCE) -> str:
    """The Debian Reference's text, one block element (paragraph, list item, ...) a line."""
    from lxml import html

    files = [root / f"{part}.en.html" for part in DEBIAN_PARTS]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise HaystackMissing(
            f"the Debian Reference needs the debian-reference-en package ({missing[0]} is missing): "
            "apt-get install debian-reference-en"
        )
    lines = []
    for path in files:
        tree = html.fromstring(path.read_bytes())
        for element in tree.iter(*BLOCKS):
            if any(parent.tag in BLOCKS for parent in element.iterancestors()):
                continue  # its text is part of the enclosing block's line
            text = " ".join(element.text_content().split())
            if text:
                lines.append(text)
    return "\n".join(lines) + "\n"
