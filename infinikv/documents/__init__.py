"""Documents a session reads: plain text, Markdown, HTML, EPUB and PDF turned into one text,
with their chapters and pages kept as character offsets into it."""

from infinikv.documents.document import Document, Section
from infinikv.documents.formats import SUFFIXES, read_document, read_path

__all__ = ["SUFFIXES", "Document", "Section", "read_document", "read_path"]
