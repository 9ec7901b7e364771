"""Read files into MARK documents for the RAG index: plain text, MARK JSONL and PDF."""

from __future__ import annotations

from pathlib import Path

from src.core.errors import DataError
from src.data.readers import Document, read_documents

FILE_TYPES = ("txt", "jsonl", "pdf")


def _files(path: Path, file_type: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob(f"*.{file_type}") if p.is_file())
        if not files:
            raise DataError(f"{path}: no .{file_type} files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return [path]


def read_text_file(path: Path) -> list[Document]:
    """A ``.txt`` file as one document (id: the file name without extension)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return [Document(id=path.stem, text=text, metadata={"source": str(path)})]


def read_pdf_file(path: Path) -> list[Document]:
    """A PDF, one document per page that has text (id ``<file name>#p<page>``, pages from 1)."""
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, OSError) as err:
        raise DataError(f"{path}: cannot read PDF ({err})") from None
    docs = [
        Document(id=f"{path.stem}#p{number}", text=text, metadata={"source": str(path), "page": number})
        for number, text in enumerate(pages, start=1)
        if text.strip()
    ]
    if not docs:
        raise DataError(f"{path}: no extractable text in {len(pages)} page(s) (a scanned PDF needs OCR first)")
    return docs


def read_files(path: str | Path, file_type: str = "txt") -> list[Document]:
    """The documents of a file, or of every ``*.<file_type>`` file in a folder.

    ``txt``: one document per file; ``jsonl``: MARK's ``{id, text, metadata}`` lines;
    ``pdf``: one document per page. Problems are one-line ``DataError``s.
    """
    if file_type not in FILE_TYPES:
        raise DataError(f"file_type '{file_type}': expected one of {', '.join(FILE_TYPES)}")
    docs: list[Document] = []
    for file in _files(Path(path), file_type):
        if file_type == "txt":
            docs += read_text_file(file)
        elif file_type == "jsonl":
            docs += read_documents(file)
        else:
            docs += read_pdf_file(file)
    return docs
