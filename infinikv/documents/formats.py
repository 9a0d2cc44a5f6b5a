"""The reader of each file type, chosen by the file name's suffix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePath

from infinikv.documents.document import Document
from infinikv.documents.epub import read_epub
from infinikv.documents.html import read_html
from infinikv.documents.pdf import read_pdf
from infinikv.documents.text import read_markdown, read_text
from infinikv.errors import DocumentError, UnsupportedDocumentError

READERS: dict[str, Callable[[str, bytes], Document]] = {
    ".txt": read_text,
    ".text": read_text,
    ".md": read_markdown,
    ".markdown": read_markdown,
    ".html": read_html,
    ".htm": read_html,
    ".xhtml": read_html,
    ".epub": read_epub,
    ".pdf": read_pdf,
}
SUFFIXES = tuple(READERS)
# The libraries of the optional `books` extra, by the suffixes that need them.
LIBRARIES = {
    ".html": "lxml",
    ".htm": "lxml",
    ".xhtml": "lxml",
    ".md": "markdown_it",
    ".markdown": "markdown_it",
    ".epub": "ebooklib",
    ".pdf": "pypdf",
}


def read_document(name: str, data: bytes) -> Document:
    """The text of file `name` whose bytes are `data`, with its chapters or pages."""
    suffix = PurePath(name).suffix.lower()
    reader = READERS.get(suffix)
    if reader is None:
        raise UnsupportedDocumentError(f"{name}: unsupported file type; send one of {', '.join(SUFFIXES)}")
    try:
        document = reader(name, data)
    except ModuleNotFoundError as e:
        raise DocumentError(
            f"reading {suffix} files needs {LIBRARIES.get(suffix, e.name)}: pip install 'infinikv[books]'"
        ) from e
    if not document.text.strip():
        raise DocumentError(f"{name} holds no text")
    return document


def read_path(path: str | Path) -> Document:
    path = Path(path)
    return read_document(path.name, path.read_bytes())
