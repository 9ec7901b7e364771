"""Find source files and read them into documents: one small reader function per format.

    for source in iter_source_files(["docs/"], include=["*.md", "*.html"], exclude=["drafts/*"]):
        documents = read_source_file(source)          # list[Document]

Formats (by extension) and the parser behind each:

=====================  ==============================================================
``.txt``               plain UTF-8 text, one document
``.md`` ``.markdown``  markdown-it-py (CommonMark): headings give the sections; the text
                       is kept as written
``.rst``               docutils: section titles give the sections; the text is the parsed
                       body (directives rendered as their text)
``.html`` ``.htm``     lxml drops navigation, sidebars, headers/footers, forms and scripts;
                       trafilatura extracts the main content as Markdown (headings kept),
                       whose headings give the sections
``.pdf``               pypdf, one document per page with text (id ``report.pdf#p3``)
``.docx``              python-docx: paragraphs and tables in order; ``Title`` / ``Heading N``
                       styles give the sections
``.csv`` ``.tsv``      the csv module, one document per row (:class:`ReaderOptions` names the
                       text, id and title columns)
``.jsonl`` ``.json``   MARK's ``{id, text, metadata}`` or BEIR's ``{_id, title, text}``, one
                       document per record (a ``.json`` file holds a list of them, or one)
``.parquet``           pyarrow, one document per row
a ``datasets`` folder  a Hugging Face ``save_to_disk`` folder (``datasets.load_from_disk``),
                       one document per row (every split of a ``DatasetDict``)
=====================  ==============================================================

A document's id is its file's path relative to the root that was given
(``guide/install.html``), ``#p<page>`` for PDF pages; a row's id comes from its id column
(``<path>#<row>`` when the file has no id column). Metadata: ``source`` (the relative
path), ``format``, ``title``, ``mtime``, ``content_hash`` (SHA-256 of the file's bytes), and
``sections`` where the format has headings: ``[{"heading_path": [...], "start", "end"}]``,
character ranges that cover ``text`` in order. A file that cannot be read raises
:class:`~src.core.errors.UnreadableFileError` naming the file and why.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from src.core.errors import DataError, UnreadableFileError
from src.data.readers import Document, JsonLineError, iter_json_objects

# Bytes inspected for NUL bytes, the mark of a binary file under a text extension.
BINARY_SNIFF_BYTES = 8192
DATASETS_FORMAT = "datasets"


class ReaderOptions(BaseModel):
    """Which fields of a row-per-document file (CSV/TSV, JSONL/JSON, parquet, datasets) hold what."""

    model_config = ConfigDict(extra="forbid")

    text_column: str = Field("text", description="column/field holding the document text")
    id_column: str = Field("id", description="column/field holding the document id (BEIR's `_id` is also read); "
                           "without it a row's id is `<path>#<row number>`")
    title_column: str = Field("title", description="column/field holding the title (optional)")


@dataclass(frozen=True)
class SourceFile:
    """A file (or a ``datasets`` folder) to read: ``path`` absolute, ``root`` the folder it was
    found under (for a file given directly, its parent), ``rel_id`` the posix path from root."""

    path: Path
    root: Path
    rel_id: str

    @property
    def format(self) -> Optional[str]:
        """The reader's format name (``markdown``, ``pdf``, ...), None when unsupported."""
        return source_format(self.path)


class _Unreadable(Exception):
    """Raised inside a reader; :func:`read_source_file` turns it into ``UnreadableFileError``."""


RowLocation = str  # "line 3", "row 7", "train row 2": where a record sits, for error messages
Reader = Callable[[bytes, SourceFile, ReaderOptions], list[tuple[str, str, dict[str, Any]]]]
_READERS: dict[str, tuple[str, Reader]] = {}


def register_reader(format_name: str, *extensions: str) -> Callable[[Reader], Reader]:
    """Register ``fn(data, source, options) -> [(id, text, metadata), ...]`` for file extensions."""

    def register(fn: Reader) -> Reader:
        for ext in extensions:
            _READERS[ext.lower()] = (format_name, fn)
        return fn

    return register


def supported_extensions() -> list[str]:
    """The file extensions that have a reader (a ``datasets`` folder is found by its files)."""
    return sorted(_READERS)


def is_datasets_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset(Dict).save_to_disk``."""
    return path.is_dir() and (
        ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
        or (path / "dataset_dict.json").is_file()
    )


def source_format(path: Path) -> Optional[str]:
    if is_datasets_folder(path):
        return DATASETS_FORMAT
    entry = _READERS.get(path.suffix.lower())
    return entry[0] if entry else None


# ---------------------------------------------------------------------------- discovery
def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(rel_id: str, pattern: str) -> bool:
    # fnmatch's `*` also crosses `/`; a pattern also matches the bare file name, and `**/x` matches `x` at the root.
    name = rel_id.rsplit("/", 1)[-1]
    candidates = [pattern] + ([pattern[3:]] if pattern.startswith("**/") else [])
    return any(fnmatch.fnmatchcase(rel_id, p) or fnmatch.fnmatchcase(name, p) for p in candidates)


def _selected(rel_id: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(_matches(rel_id, p) for p in include):
        return False
    return not any(_matches(rel_id, p) for p in exclude)


def _walk(root: Path) -> list[Path]:
    """Supported files and ``datasets`` folders under ``root``; hidden files and folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for name in dirnames:
            if name.startswith("."):
                continue
            if is_datasets_folder(here / name):
                found.append(here / name)  # read as one source, not descended into
            else:
                keep.append(name)
        dirnames[:] = keep
        found += [here / n for n in filenames if not n.startswith(".") and Path(n).suffix.lower() in _READERS]
    return found


def iter_source_files(
    paths: str | Path | Iterable[str | Path],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> Iterator[SourceFile]:
    """The files to read under ``paths`` (files and folders, folders recursively).

    In a folder only files with a registered extension (and ``datasets`` folders) are
    taken; hidden files and folders are skipped. A file given directly is always taken
    (its reader decides). ``include`` / ``exclude`` are glob patterns matched against the
    path relative to its root and against the file name (``*`` also crosses ``/``):
    ``*.md``, ``guide/*``, ``**/drafts/*``. Order: the paths in the order given, each's
    files sorted by relative path; a file reached twice is yielded once. A path that
    does not exist is a ``DataError``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    include_list, exclude_list = _as_list(include), _as_list(exclude)
    seen: set[Path] = set()
    for given in paths:
        given = Path(given).expanduser()
        if not given.exists():
            raise DataError(f"{given}: no such file or folder")
        resolved = given.resolve()
        if resolved.is_dir() and not is_datasets_folder(resolved):
            root = resolved
            candidates = sorted((p.relative_to(root).as_posix(), p) for p in _walk(root))
        else:
            root = resolved.parent
            candidates = [(resolved.name, resolved)]
        for rel_id, path in candidates:
            if path in seen or not _selected(rel_id, include_list, exclude_list):
                continue
            seen.add(path)
            yield SourceFile(path=path, root=root, rel_id=rel_id)


# ---------------------------------------------------------------------------- reading
def _content_hash(path: Path, data: bytes) -> str:
    if not path.is_dir():
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()  # a folder: its files' relative names and bytes, in name order
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_source_file(source: SourceFile, options: ReaderOptions | None = None) -> list[Document]:
    """The documents of one source, with their metadata; ``UnreadableFileError`` if it has none.

    Every parser error is turned into one ``UnreadableFileError`` line naming the file.
    """
    path = source.path
    fmt = source_format(path)
    if fmt is None:
        raise UnreadableFileError(path, f"unsupported file type '{path.suffix}' (supported: {', '.join(supported_extensions())} and datasets folders)")
    reader = _read_datasets_folder if fmt == DATASETS_FORMAT else _READERS[path.suffix.lower()][1]
    try:
        data = b"" if path.is_dir() else path.read_bytes()
        mtime = path.stat().st_mtime
        content_hash = _content_hash(path, data)
    except OSError as err:
        raise UnreadableFileError(path, f"cannot read ({err.strerror or err})") from None
    try:
        records = reader(data, source, options or ReaderOptions())
    except _Unreadable as err:
        raise UnreadableFileError(path, str(err)) from None
    except Exception as err:  # a parser's own error on a malformed file
        raise UnreadableFileError(path, f"cannot parse as {fmt} ({type(err).__name__}: {err})") from None
    if not records:
        raise UnreadableFileError(path, "no text")
    base = {"source": source.rel_id, "format": fmt, "mtime": mtime, "content_hash": content_hash}
    default_title = Path(source.rel_id).stem if fmt != DATASETS_FORMAT else Path(source.rel_id).name
    return [
        Document(id=doc_id, text=text, metadata={"title": default_title, **metadata, **base})
        for doc_id, text, metadata in records
    ]


def read_files(
    paths: str | Path | Iterable[str | Path],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    options: ReaderOptions | None = None,
) -> list[Document]:
    """Every document under ``paths``; the first unreadable file raises (ingestion skips instead).

    Two documents with the same id are a ``DataError`` naming both sources.
    """
    docs: list[Document] = []
    where: dict[str, str] = {}
    for source in iter_source_files(paths, include, exclude):
        for doc in read_source_file(source, options):
            if doc.id in where:
                raise DataError(f"document id '{doc.id}' comes from both {where[doc.id]} and {source.path}")
            where[doc.id] = str(source.path)
            docs.append(doc)
    return docs


# ---------------------------------------------------------------------------- text helpers
def _decode(data: bytes) -> str:
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise _Unreadable("binary data (NUL bytes) under a text extension")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _Unreadable(f"not UTF-8 text ({err.reason} at byte {err.start})") from None


def _sections(length: int, headings: list[tuple[int, int, str]]) -> list[dict[str, Any]]:
    """Sections covering ``[0, length)`` from ``(char offset, level, title)`` headings in order.

    Each heading starts a section that runs to the next heading; its heading path is the
    titles of the enclosing headings (lower levels) and its own. Text before the first
    heading is a section with an empty path (or joins the first one when it is blank).
    """
    if not headings:
        return []
    sections: list[dict[str, Any]] = []
    stack: list[tuple[int, str]] = []
    for i, (offset, level, title) in enumerate(headings):
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        end = headings[i + 1][0] if i + 1 < len(headings) else length
        sections.append({"heading_path": [t for _, t in stack], "start": offset, "end": end})
    sections[0]["start"] = 0
    return sections


def _with_preamble(text: str, headings: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    # Text before the first heading keeps an empty heading path (level 0 is popped by any heading).
    if headings and headings[0][0] > 0 and text[: headings[0][0]].strip():
        return [(0, 0, "")] + headings
    return headings


def _structured(text: str, headings: list[tuple[int, int, str]], title: Optional[str]) -> dict[str, Any]:
    sections = _sections(len(text), _with_preamble(text, headings))
    for section in sections:
        section["heading_path"] = [t for t in section["heading_path"] if t]
    metadata: dict[str, Any] = {"sections": sections} if sections else {}
    first_title = title or next((t for _, level, t in sorted(headings, key=lambda h: h[1]) if t), None)
    if first_title:
        metadata["title"] = first_title
    return metadata


def _assemble(blocks: list[tuple[Optional[int], str]]) -> tuple[str, list[tuple[int, int, str]]]:
    """Join ``(heading level or None, text)`` blocks with blank lines; returns (text, headings)."""
    parts: list[str] = []
    headings: list[tuple[int, int, str]] = []
    pos = 0
    for level, block in blocks:
        block = block.strip()
        if not block:
            continue
        if parts:
            pos += 2
        if level is not None:
            headings.append((pos, level, " ".join(block.split())))
        parts.append(block)
        pos += len(block)
    return "\n\n".join(parts), headings


def _need_text(text: str) -> str:
    if not text.strip():
        raise _Unreadable("no text")
    return text


# ---------------------------------------------------------------------------- one reader per format
@register_reader("text", ".txt")
def _read_text(data: bytes, source: SourceFile, options: ReaderOptions):
    return [(source.rel_id, _need_text(_decode(data)), {})]


def markdown_headings(text: str) -> list[tuple[int, int, str]]:
    """``(char offset, level, title)`` of every CommonMark heading (ATX and setext) in ``text``."""
    from markdown_it import MarkdownIt

    line_starts = [0]
    for line in text.split("\n"):
        line_starts.append(line_starts[-1] + len(line) + 1)
    tokens = MarkdownIt("commonmark").parse(text)
    headings = []
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.map:
            title = " ".join(tokens[i + 1].content.split()) if i + 1 < len(tokens) else ""
            headings.append((line_starts[token.map[0]], int(token.tag[1:]), title))
    return headings


@register_reader("markdown", ".md", ".markdown")
def _read_markdown(data: bytes, source: SourceFile, options: ReaderOptions):
    text = _need_text(_decode(data))
    return [(source.rel_id, text, _structured(text, markdown_headings(text), None))]


@register_reader("rst", ".rst")
def _read_rst(data: bytes, source: SourceFile, options: ReaderOptions):
    from docutils import nodes
    from docutils.core import publish_doctree

    source_text = _need_text(_decode(data))
    doctree = publish_doctree(
        source_text,
        source_path=str(source.path),
        settings_overrides={
            "doctitle_xform": False,  # keep the top title a section like the others
            "report_level": 5,
            "halt_level": 5,
            "warning_stream": io.StringIO(),
            "file_insertion_enabled": False,
            "raw_enabled": False,
        },
    )
    skip = (nodes.system_message, nodes.comment, nodes.substitution_definition, nodes.target, nodes.title, nodes.docinfo)
    blocks: list[tuple[Optional[int], str]] = []

    def walk(node, depth: int) -> None:
        for child in node.children:
            if isinstance(child, nodes.section):
                title = child[0].astext() if child.children and isinstance(child[0], nodes.title) else ""
                blocks.append((depth + 1, title))
                walk(child, depth + 1)
            elif not isinstance(child, skip):
                blocks.append((None, child.astext()))

    walk(doctree, 0)
    text, headings = _assemble(blocks)
    return [(source.rel_id, _need_text(text), _structured(text, headings, None))]


# Elements that are navigation or page furniture, never content.
_BOILERPLATE_TAGS = {"script", "style", "noscript", "template", "nav", "aside", "form", "iframe", "svg", "button", "select"}
_BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar"}
_BOILERPLATE_NAMES = {"sidebar", "nav", "navbar", "navigation", "menu", "breadcrumb", "breadcrumbs", "toc", "footer", "sidenav", "cookie", "cookies"}


def _is_boilerplate(element) -> bool:
    tag = element.tag if isinstance(element.tag, str) else ""
    if tag in ("html", "body", "main", "article"):
        return False
    if tag in _BOILERPLATE_TAGS or element.get("role", "").lower() in _BOILERPLATE_ROLES:
        return True
    if tag in ("header", "footer"):  # the page's header/footer, not an article's own
        return not any(a.tag in ("main", "article") for a in element.iterancestors())
    names = f"{element.get('class', '')} {element.get('id', '')}".lower().replace("-", " ").replace("_", " ").split()
    return any(n in _BOILERPLATE_NAMES for n in names)


@register_reader("html", ".html", ".htm")
def _read_html(data: bytes, source: SourceFile, options: ReaderOptions):
    import trafilatura

    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise _Unreadable("binary data (NUL bytes) under a text extension")
    tree = trafilatura.load_html(data)  # decodes with the page's declared or detected charset
    if tree is None:
        raise _Unreadable("not parseable as HTML")
    page_title = " ".join((tree.findtext(".//title") or "").split()) or None
    for element in [e for e in tree.iter() if isinstance(e.tag, str) and _is_boilerplate(e)]:
        if element.getparent() is not None:
            element.drop_tree()
    text = trafilatura.extract(
        tree,
        output_format="markdown",
        include_formatting=True,  # headings as `#` lines
        include_tables=True,
        include_links=False,
        include_images=False,
        include_comments=False,
        favor_recall=True,
        deduplicate=False,
    )
    text = _need_text(text or "")
    return [(source.rel_id, text, _structured(text, markdown_headings(text), page_title))]


@register_reader("pdf", ".pdf")
def _read_pdf(data: bytes, source: SourceFile, options: ReaderOptions):
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Unreadable("encrypted PDF")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or None
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as err:
        raise _Unreadable(f"not a readable PDF ({type(err).__name__}: {err})") from None
    records = [
        (f"{source.rel_id}#p{number}", text, {"page": number, **({"title": title} if title else {})})
        for number, text in enumerate(pages, start=1)
        if text.strip()
    ]
    if not records:
        raise _Unreadable(f"no extractable text in {len(pages)} page(s) (a scanned PDF needs OCR first)")
    return records


@register_reader("docx", ".docx")
def _read_docx(data: bytes, source: SourceFile, options: ReaderOptions):
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as err:  # python-docx raises zipfile/KeyError/ValueError on non-DOCX bytes
        raise _Unreadable(f"not a readable DOCX ({type(err).__name__}: {err})") from None
    blocks: list[tuple[Optional[int], str]] = []
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            rows = [" | ".join(cell.text.strip() for cell in row.cells) for row in item.rows]
            blocks.append((None, "\n".join(rows)))
            continue
        style = (item.style.name if item.style is not None else "") or ""
        level = 0 if style == "Title" else int(style[8:]) if style.startswith("Heading ") and style[8:].isdigit() else None
        blocks.append((level, item.text))
    text, headings = _assemble(blocks)
    title = (document.core_properties.title or "").strip() or None
    return [(source.rel_id, _need_text(text), _structured(text, headings, title))]


# ---------------------------------------------------------------------------- row-per-document formats
def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def _row_records(
    rows: Iterable[tuple[RowLocation, dict[str, Any]]], source: SourceFile, options: ReaderOptions, id_prefix: str = ""
) -> list[tuple[str, str, dict[str, Any]]]:
    """One ``(id, text, metadata)`` per row. BEIR rows (``_id``, no id column) read ``title + " " + text``
    as BEIR does; other fields of a row go into its metadata (with a ``metadata`` dict merged in)."""
    id_col, text_col, title_col = options.id_column, options.text_column, options.title_column
    records, seen = [], {}
    for number, (where, row) in enumerate(rows, start=1):
        beir = id_col not in row and "_id" in row
        if text_col not in row:
            raise _Unreadable(f"{where}: no '{text_col}' field (fields: {', '.join(map(str, row))}); set the text column")
        raw_id = row["_id"] if beir else row.get(id_col, f"{source.rel_id}#{id_prefix}{number}")
        if raw_id is None or not str(raw_id).strip():
            raise _Unreadable(f"{where}: empty id")
        doc_id = str(raw_id)
        title = row.get(title_col)
        title = str(title).strip() if title is not None else ""
        text = row.get(text_col)
        text = "" if text is None else str(text)
        if beir:
            text = f"{title} {text}".strip()
        if not text.strip():
            raise _Unreadable(f"{where}: empty text")
        if doc_id in seen:
            raise _Unreadable(f"{where}: duplicate document id '{doc_id}' (first at {seen[doc_id]})")
        seen[doc_id] = where
        metadata: dict[str, Any] = {}
        nested = row.get("metadata")
        if isinstance(nested, dict):
            metadata.update({str(k): _json_safe(v) for k, v in nested.items()})
        used = {id_col, "_id", text_col, title_col, "metadata"}
        metadata.update({str(k): _json_safe(v) for k, v in row.items() if k not in used and k is not None})
        if title:
            metadata["title"] = title
        else:
            metadata.setdefault("title", doc_id)
        metadata["row"] = number
        records.append((doc_id, text, metadata))
    return records


def _json_lines(text: str) -> Iterator[tuple[RowLocation, dict[str, Any]]]:
    try:
        for lineno, obj in iter_json_objects(text.split("\n")):
            yield f"line {lineno}", obj
    except JsonLineError as err:
        raise _Unreadable(str(err)) from None


@register_reader("jsonl", ".jsonl")
def _read_jsonl(data: bytes, source: SourceFile, options: ReaderOptions):
    return _row_records(_json_lines(_decode(data)), source, options)


@register_reader("json", ".json")
def _read_json(data: bytes, source: SourceFile, options: ReaderOptions):
    try:
        obj = json.loads(_decode(data))
    except json.JSONDecodeError as err:
        raise _Unreadable(f"line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    items = obj if isinstance(obj, list) else [obj]
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise _Unreadable(f"item {number}: expected a JSON object, got {type(item).__name__}")
    return _row_records(((f"item {n}", item) for n, item in enumerate(items, start=1)), source, options)


@register_reader("csv", ".csv", ".tsv")
def _read_csv(data: bytes, source: SourceFile, options: ReaderOptions):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # document texts are longer than csv's 128 KiB default
    reader = csv.DictReader(io.StringIO(_decode(data), newline=""), delimiter="\t" if source.path.suffix.lower() == ".tsv" else ",")

    def rows():
        try:
            for row in reader:
                row.pop(None, None)  # cells beyond the header
                yield f"line {reader.line_num}", row
        except csv.Error as err:
            raise _Unreadable(f"line {reader.line_num}: {err}") from None

    return _row_records(rows(), source, options)


@register_reader("parquet", ".parquet")
def _read_parquet(data: bytes, source: SourceFile, options: ReaderOptions):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise _Unreadable(f"not a readable parquet file ({err})") from None
    return _row_records(((f"row {n}", row) for n, row in enumerate(table.to_pylist(), start=1)), source, options)


def _read_datasets_folder(data: bytes, source: SourceFile, options: ReaderOptions):
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(source.path))
    except Exception as err:  # datasets raises FileNotFoundError/ValueError/arrow errors for broken folders
        raise _Unreadable(f"not a readable datasets folder ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, DatasetDict):
        return _row_records(((f"row {n}", row) for n, row in enumerate(loaded, start=1)), source, options)
    records = []
    for split in sorted(loaded):
        rows = ((f"{split} row {n}", row) for n, row in enumerate(loaded[split], start=1))
        records += _row_records(rows, source, options, id_prefix=f"{split}/")
    ids = [r[0] for r in records]
    if len(ids) != len(set(ids)):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise _Unreadable(f"duplicate document id '{duplicate}' across splits")
    return records
