"""HTML and XHTML to lines of text with lxml's parser: each block element (paragraph, list
item, heading, table cell) a line, whitespace inside it collapsed, <pre> kept as it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from infinikv.documents.document import Document, DocumentBuilder
from infinikv.errors import DocumentError

if TYPE_CHECKING:
    from lxml import etree

BLOCKS = frozenset(
    "address article aside blockquote body br dd div dl dt figcaption figure footer h1 h2 h3 h4 h5 "
    "h6 header hr li main nav ol p section table tbody thead tr td th ul".split()
)
SKIPPED = frozenset({"script", "style", "head", "noscript", "template", "svg", "math"})
CHAPTER_HEADINGS = frozenset({"h1", "h2"})


@dataclass
class Chapter:
    title: str
    lines: list[str] = field(default_factory=list)


@dataclass
class _Lines:
    """Lines of text as the walk finds them, split into chapters at h1 / h2 headings."""

    chapters: list[Chapter] = field(default_factory=lambda: [Chapter("")])
    pending: list[str] = field(default_factory=list)  # inline text of the open line

    def text(self, piece: str | None) -> None:
        if piece:
            self.pending.append(piece)

    def end_line(self) -> None:
        line = " ".join("".join(self.pending).split())
        self.pending.clear()
        if line:
            self.chapters[-1].lines.append(line)

    def walk(self, element: etree._Element) -> None:
        tag = element.tag.lower().rsplit("}", 1)[-1] if isinstance(element.tag, str) else ""
        if tag in SKIPPED or not isinstance(element.tag, str):  # comments, processing instructions
            self.text(element.tail)
            return
        if tag in BLOCKS:
            self.end_line()
        if tag in CHAPTER_HEADINGS:
            self.chapters.append(Chapter(" ".join(element.text_content().split())))
        if tag == "pre":
            self.end_line()
            self.chapters[-1].lines.append(element.text_content().strip("\n"))
        else:
            self.text(element.text)
            for child in element:
                self.walk(child)
        if tag in BLOCKS:
            self.end_line()
        self.text(element.tail)


def parse_html(name: str, data: bytes) -> etree._Element:
    from lxml import etree
    from lxml import html as lxml_html

    try:
        root = lxml_html.document_fromstring(data)
    except (etree.ParserError, ValueError) as e:
        raise DocumentError(f"{name} is not readable HTML: {e}") from e
    return root


def html_chapters(name: str, data: bytes) -> list[Chapter]:
    """The chapters of an HTML document (a new one at each h1 / h2), their lines of text;
    the first holds what comes before any heading (title "")."""
    walk = _Lines()
    root = parse_html(name, data)
    body = root.find("body")
    walk.walk(root if body is None else body)
    walk.end_line()
    return [c for c in walk.chapters if c.lines]


def read_html(name: str, data: bytes) -> Document:
    """An HTML page: a chapter per h1 / h2 heading."""
    doc = DocumentBuilder(name)
    for i, chapter in enumerate(html_chapters(name, data)):
        doc.add("chapter", chapter.title or f"part {i + 1}", "\n".join(chapter.lines))
    return doc.build()
