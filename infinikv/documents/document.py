"""A document as the engine reads it: its text and where its chapters or pages sit in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SectionKind = Literal["chapter", "page"]
# Between two chapters or pages: a paragraph break, so the model reads them as separate.
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Section:
    """A chapter or a page: text[start:end] of its document."""

    kind: SectionKind
    title: str
    start: int
    end: int


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    sections: tuple[Section, ...] = ()


@dataclass
class DocumentBuilder:
    """Joins parts (a chapter, a page) into one text and records where each one lies."""

    name: str
    parts: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    length: int = 0

    def add(self, kind: SectionKind, title: str, text: str) -> None:
        text = text.strip()
        if not text:
            return  # an empty page (a scanned image, a blank chapter divider) adds no section
        if self.parts:
            self.parts.append(SEPARATOR)
            self.length += len(SEPARATOR)
        self.parts.append(text)
        self.sections.append(Section(kind, title, self.length, self.length + len(text)))
        self.length += len(text)

    def build(self) -> Document:
        return Document(self.name, "".join(self.parts), tuple(self.sections))
