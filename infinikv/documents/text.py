"""Plain text and Markdown, read as they are (UTF-8); a Markdown file's h1 / h2 headings
start its chapters (found by markdown-it-py, so a '#' line inside a code block is not one)."""

from __future__ import annotations

from infinikv.documents.document import Document, DocumentBuilder
from infinikv.errors import DocumentError


def decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{name} is not UTF-8 text: {e}") from e


def read_text(name: str, data: bytes) -> Document:
    return Document(name, decode(name, data))


def read_markdown(name: str, data: bytes) -> Document:
    from markdown_it import MarkdownIt

    text = decode(name, data)
    lines = text.splitlines(keepends=True)
    starts = [0] + [
        token.map[0]
        for token in MarkdownIt().parse(text)
        if token.type == "heading_open" and token.tag in ("h1", "h2") and token.map and token.map[0] > 0
    ]
    doc = DocumentBuilder(name)
    for i, (start, end) in enumerate(zip(starts, [*starts[1:], len(lines)], strict=True)):
        chapter = "".join(lines[start:end])
        first = chapter.lstrip().splitlines()[0] if chapter.strip() else ""
        title = first.lstrip("#").strip() if first.startswith("#") else f"part {i + 1}"
        doc.add("chapter", title, chapter)
    return doc.build()
