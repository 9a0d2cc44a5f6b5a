"""PDF through pypdf (pure Python, no system library): the text layer page by page, each
page a section titled by its page label."""

from __future__ import annotations

import io

from infinikv.documents.document import Document, DocumentBuilder
from infinikv.errors import DocumentError


def read_pdf(name: str, data: bytes) -> Document:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{name} is encrypted with a password")
        labels = reader.page_labels
        doc = DocumentBuilder(name)
        for i, page in enumerate(reader.pages):
            doc.add("page", f"page {labels[i] if i < len(labels) else i + 1}", page.extract_text())
    except DocumentError:
        raise
    except Exception as e:  # pypdf's PdfReadError and the errors of a damaged file's objects
        raise DocumentError(f"{name} is not a readable PDF: {type(e).__name__}: {e}") from e
    if not doc.sections:
        raise DocumentError(f"{name} has no text layer (a scanned PDF needs OCR first)")
    return doc.build()
