"""Small real books made in the tests: chapters of the King James Bible (Debian's bible-kjv)
written as an EPUB by ebooklib and as a PDF by fpdf2 (each chapter from a new page)."""

from __future__ import annotations

import io
import shutil
import subprocess

import pytest


def genesis(chapters: int) -> list[list[str]]:
    """The verses of Genesis 1..chapters, without their references."""
    if shutil.which("bible") is None:
        pytest.skip("needs the bible-kjv package (apt-get install bible-kjv)")
    out = subprocess.run(
        ["bible", "-f", f"Gen1:1-Gen{chapters}:99"], capture_output=True, text=True, check=True
    )
    verses: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        ref, _, verse = line.partition(" ")
        verses.setdefault(ref.split(":")[0], []).append(verse.strip())
    return list(verses.values())[:chapters]


def epub_book(chapters: list[list[str]]) -> bytes:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("kjv-genesis")
    book.set_title("Genesis")
    book.set_language("en")
    items = []
    for i, verses in enumerate(chapters, 1):
        item = epub.EpubHtml(title=f"Chapter {i}", file_name=f"chapter{i}.xhtml", lang="en")
        item.content = f"<h1>Genesis {i}</h1>" + "".join(f"<p>{v}</p>" for v in verses)
        book.add_item(item)
        items.append(item)
    book.toc = items
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *items]
    out = io.BytesIO()
    epub.write_epub(out, book)
    return out.getvalue()


def pdf_book(chapters: list[list[str]], password: str | None = None) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    if password is not None:
        pdf.set_encryption(owner_password="owner", user_password=password)
    for verses in chapters:
        pdf.add_page()
        pdf.multi_cell(0, 5, "\n".join(verses))
    return bytes(pdf.output())
