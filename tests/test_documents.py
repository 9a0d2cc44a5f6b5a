"""Reading uploaded documents (infinikv/documents): real books as EPUB and PDF, real HTML (the
Debian Reference), Markdown; their chapters and pages as offsets; clear errors for the rest."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from infinikv.documents import epub as epub_reader
from infinikv.documents import read_document, read_path
from infinikv.errors import DocumentError, UnsupportedDocumentError

from .books import epub_book, genesis, pdf_book

DEBIAN_CHAPTER = Path("/usr/share/debian-reference/ch01.en.html")


def words(text: str) -> list[str]:
    return text.split()


def test_epub_chapters_in_reading_order_titled_by_the_toc() -> None:
    chapters = genesis(3)
    doc = read_document("genesis.epub", epub_book(chapters))
    assert [(s.kind, s.title) for s in doc.sections] == [("chapter", f"Chapter {i}") for i in (1, 2, 3)]
    for number, (section, verses) in enumerate(zip(doc.sections, chapters, strict=True), 1):
        body = doc.text[section.start : section.end]
        assert words(body) == ["Genesis", str(number), *words(" ".join(verses))]
    assert "Table of Contents" not in doc.text  # the nav document is not the book's text


def test_pdf_pages_hold_the_text_in_order() -> None:
    chapters = genesis(3)
    doc = read_document("genesis.pdf", pdf_book(chapters))
    assert all(s.kind == "page" for s in doc.sections) and len(doc.sections) >= 3
    assert [s.title for s in doc.sections] == [f"page {i}" for i in range(1, len(doc.sections) + 1)]
    # The text layer reflows lines; the words come back in order.
    assert words(doc.text) == words(" ".join(v for verses in chapters for v in verses))
    first = doc.sections[0]
    assert doc.text[first.start : first.end].startswith("In the beginning God created the heaven")


def test_html_chapters_at_headings_scripts_dropped_pre_kept() -> None:
    page = b"""<html><head><title>t</title><style>p {}</style></head><body>
    <p>Before any <b>heading</b>.</p><script>var x = 1;</script>
    <h1>First</h1><p>One   two</p><ul><li>three</li><li>four</li></ul>
    <h2>Second</h2><pre>  keep   this
  layout</pre></body></html>"""
    doc = read_document("page.html", page)
    assert [s.title for s in doc.sections] == ["part 1", "First", "Second"]
    assert doc.text == "Before any heading.\n\nFirst\nOne two\nthree\nfour\n\nSecond\n  keep   this\n  layout"


@pytest.mark.skipif(not DEBIAN_CHAPTER.exists(), reason="needs debian-reference-en")
def test_real_html_manual() -> None:
    doc = read_path(DEBIAN_CHAPTER)
    assert "Chapter 1. GNU/Linux tutorials" in [s.title for s in doc.sections]
    assert "1.1. Console basics" in [s.title for s in doc.sections]
    assert len(doc.text) > 50_000 and "<p>" not in doc.text and "function(" not in doc.text


def test_markdown_chapters_skip_headings_in_code() -> None:
    text = "Intro line.\n\n# Install\n\n```sh\n# not a heading\napt-get install x\n```\n\n## Use\n\nRun it.\n"
    doc = read_document("guide.md", text.encode())
    assert [s.title for s in doc.sections] == ["part 1", "Install", "Use"]
    assert "# not a heading" in doc.text[doc.sections[1].start : doc.sections[1].end]


def test_plain_text_is_read_as_it_is() -> None:
    doc = read_document("notes.txt", "\ufeffcafé\nline two\n".encode())
    assert doc.text == "café\nline two\n" and doc.sections == ()


def _zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("book.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog", "book.pdf is not a readable PDF"),
        ("book.epub", b"PK\x03\x04 not really a zip", "book.epub is not a readable EPUB"),
        ("book.epub", _zip({"mimetype": b"application/epub+zip"}), "book.epub is not a readable EPUB"),
        ("notes.txt", b"\xff\xfe\x00 latin", "notes.txt is not UTF-8 text"),
        ("empty.md", b"  \n\n ", "empty.md holds no text"),
        ("page.html", b"<html><body><script>x()</script></body></html>", "page.html holds no text"),
    ],
)
def test_corrupt_or_empty_files_are_named(name: str, data: bytes, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        read_document(name, data)


def test_truncated_pdf_and_epub_are_refused() -> None:
    chapters = genesis(2)
    for name, data in (("g.pdf", pdf_book(chapters)), ("g.epub", epub_book(chapters))):
        with pytest.raises(DocumentError, match=f"{name} is not a readable"):
            read_document(name, data[: len(data) // 2])


def test_encrypted_pdf_needs_its_password() -> None:
    with pytest.raises(DocumentError, match="encrypted with a password"):
        read_document("secret.pdf", pdf_book(genesis(1), password="s3cret"))


def test_an_epub_that_unpacks_too_large_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(epub_reader, "MAX_UNPACKED_BYTES", 10_000)
    with pytest.raises(DocumentError, match="unpacks to"):
        read_document("bomb.epub", _zip({"mimetype": b"application/epub+zip", "big.xhtml": b"0" * 20_000}))


def test_unsupported_types_say_what_is_read() -> None:
    with pytest.raises(
        UnsupportedDocumentError, match=r"report.docx: unsupported file type; send one of .*\.epub"
    ):
        read_document("report.docx", b"PK\x03\x04")
