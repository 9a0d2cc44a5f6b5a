"""EPUB through ebooklib: the spine's documents in reading order, one chapter each, titled
from the table of contents (else the chapter's first heading)."""

from __future__ import annotations

import io
import warnings
import zipfile
from typing import Any

from infinikv.documents.document import Document, DocumentBuilder
from infinikv.documents.html import html_chapters
from infinikv.errors import DocumentError

# An EPUB is a zip: refuse one that would unpack to more than this (a zip bomb).
MAX_UNPACKED_BYTES = 512 * 2**20


def read_epub(name: str, data: bytes) -> Document:
    from ebooklib import epub

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
        if unpacked > MAX_UNPACKED_BYTES:
            raise DocumentError(f"{name} unpacks to {unpacked} bytes, over {MAX_UNPACKED_BYTES}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ebooklib's notices about its future defaults
            book = epub.read_epub(io.BytesIO(data), {"ignore_ncx": True})
    except DocumentError:
        raise
    except Exception as e:  # a corrupt zip, a missing container or package file, bad XML
        raise DocumentError(f"{name} is not a readable EPUB: {type(e).__name__}: {e}") from e
    titles = _toc_titles(book.toc)
    doc = DocumentBuilder(name)
    for i, (idref, linear) in enumerate(_spine(book.spine)):
        item = book.get_item_with_id(idref)
        if item is None:
            raise DocumentError(f"{name}: its spine names {idref!r}, which the package does not hold")
        if linear == "no" or isinstance(item, epub.EpubNav):
            continue  # the table of contents and out-of-flow notes, not the book's text
        chapters = html_chapters(f"{name}:{item.get_name()}", item.get_content())
        text = "\n".join(line for chapter in chapters for line in chapter.lines)
        heading = next((c.title for c in chapters if c.title), "")
        doc.add("chapter", titles.get(item.get_name()) or heading or f"part {i + 1}", text)
    return doc.build()


def _spine(spine: list[Any]) -> list[tuple[str, str]]:
    """(idref, linear) pairs; ebooklib gives bare idrefs for the entries it wrote itself."""
    return [(entry, "yes") if isinstance(entry, str) else (entry[0], entry[1]) for entry in spine]


def _toc_titles(toc: Any) -> dict[str, str]:
    """File name -> the first table-of-contents title that points into it."""
    titles: dict[str, str] = {}
    for entry in toc:
        if isinstance(entry, tuple):  # (a section, its entries)
            section, children = entry
            if getattr(section, "href", None):
                titles.setdefault(section.href.split("#")[0], section.title)
            for href, title in _toc_titles(children).items():
                titles.setdefault(href, title)
        elif getattr(entry, "href", None):
            titles.setdefault(entry.href.split("#")[0], entry.title)
    return titles
