"""File discovery and one reader per format (src/data/files.py), on real files made here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from src.core.errors import DataError, UnreadableFileError
from src.data.files import ReaderOptions, iter_source_files, read_files, read_source_file

HTML_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Installing MARK - MARK docs</title>
<script>var tracker = "SCRIPTJUNK";</script><style>.nav { color: red }</style></head>
<body>
<header class="site-header"><a href="/">HEADERJUNK home</a></header>
<nav><ul><li><a href="/docs">NAVJUNK documentation</a></li><li><a href="/blog">NAVJUNK blog</a></li></ul></nav>
<div class="sidebar"><h3>On this page</h3><ul><li><a href="#src">SIDEJUNK from source</a></li></ul></div>
<main><article>
<h1>Installation</h1>
<p>MARK installs with pip into a fresh virtual environment on any recent Linux distribution.</p>
<h2>From source</h2>
<p>Clone the repository and run the editable install from the root of the checkout.</p>
<p>The native decoding kernels are compiled on first use with the system C compiler.</p>
<h2>Troubleshooting</h2>
<p>If the build fails, check the compiler version and retry the installation from scratch.</p>
</article></main>
<footer>FOOTJUNK copyright and legal notices</footer>
<script>console.log("SCRIPTJUNK2")</script>
</body></html>
"""

MARKDOWN = """Some words before any heading.

# Guide

The guide explains the tool.

## Install

Run the installer.

```
# a comment in code, not a heading
```

### From source

Build it yourself.

## Usage
Call it.
"""

RST = """=====
Guide
=====

The guide explains the tool.

Install
=======

Run the installer.

.. note:: Administrators only.

From source
-----------

Build it yourself.
"""


def _sections(doc) -> list[tuple[list[str], str]]:
    return [(s["heading_path"], doc.text[s["start"] : s["end"]]) for s in doc.metadata["sections"]]


def _read(path: Path, **options) -> list:
    (source,) = list(iter_source_files(path))
    return read_source_file(source, ReaderOptions(**options) if options else None)


def _assert_sections_cover(doc) -> None:
    sections = doc.metadata["sections"]
    assert sections[0]["start"] == 0 and sections[-1]["end"] == len(doc.text)
    assert all(a["end"] == b["start"] for a, b in zip(sections, sections[1:]))


def test_html_keeps_main_content_and_headings_and_drops_navigation(tmp_path):
    (tmp_path / "guide").mkdir()
    (tmp_path / "guide" / "install.html").write_text(HTML_PAGE)
    [doc] = read_files(tmp_path)
    assert doc.id == "guide/install.html"
    for junk in ("SCRIPTJUNK", "NAVJUNK", "SIDEJUNK", "FOOTJUNK", "HEADERJUNK", "On this page", "color: red"):
        assert junk not in doc.text
    assert "fresh virtual environment" in doc.text and "system C compiler" in doc.text
    assert doc.metadata["title"] == "Installing MARK - MARK docs" and doc.metadata["format"] == "html"
    paths = [(path, text.split("\n")[0]) for path, text in _sections(doc)]
    assert paths == [
        (["Installation"], "# Installation"),
        (["Installation", "From source"], "## From source"),
        (["Installation", "Troubleshooting"], "## Troubleshooting"),
    ]
    _assert_sections_cover(doc)


def test_markdown_and_rst_headings_become_sections(tmp_path):
    (tmp_path / "guide.md").write_text(MARKDOWN)
    [md] = _read(tmp_path / "guide.md")
    assert md.text == MARKDOWN  # kept as written
    assert [p for p, _ in _sections(md)] == [[], ["Guide"], ["Guide", "Install"], ["Guide", "Install", "From source"], ["Guide", "Usage"]]
    assert "# a comment in code" in _sections(md)[2][1]  # a fenced `#` line is not a heading
    assert md.metadata["title"] == "Guide" and md.metadata["format"] == "markdown"
    _assert_sections_cover(md)

    (tmp_path / "guide.rst").write_text(RST)
    [rst] = _read(tmp_path / "guide.rst")
    assert [p for p, _ in _sections(rst)] == [["Guide"], ["Guide", "Install"], ["Guide", "Install", "From source"]]
    assert "Administrators only." in _sections(rst)[1][1] and "=====" not in rst.text
    assert rst.metadata["title"] == "Guide"
    _assert_sections_cover(rst)


def test_pdf_gives_one_document_per_page(tmp_path, pdf_writer):
    pages = [["Chapter one is about tides."], ["Chapter two is about waves", "and the wind that makes them."], ["Chapter three on currents."]]
    pdf_writer(tmp_path / "report.pdf", pages, title="Ocean report")
    docs = _read(tmp_path / "report.pdf")
    assert [d.id for d in docs] == ["report.pdf#p1", "report.pdf#p2", "report.pdf#p3"]
    assert "waves" in docs[1].text and "wind" in docs[1].text and "tides" not in docs[1].text
    assert [d.metadata["page"] for d in docs] == [1, 2, 3]
    assert all(d.metadata["title"] == "Ocean report" and d.metadata["source"] == "report.pdf" for d in docs)


def test_docx_heading_styles_become_sections(tmp_path):
    import docx

    document = docx.Document()
    document.add_heading("Handbook", level=0)
    document.add_paragraph("Welcome to the handbook.")
    document.add_heading("Leave", level=1)
    document.add_paragraph("Ask your manager two weeks ahead.")
    document.add_heading("Sick leave", level=2)
    document.add_paragraph("Call in before nine.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "days", "pay"
    table.cell(1, 0).text, table.cell(1, 1).text = "10", "full"
    document.add_heading("Expenses", level=1)
    document.add_paragraph("Keep every receipt.")
    document.save(tmp_path / "handbook.docx")

    [doc] = _read(tmp_path / "handbook.docx")
    assert doc.id == "handbook.docx" and doc.metadata["title"] == "Handbook"
    sections = _sections(doc)
    assert [p for p, _ in sections] == [["Handbook"], ["Handbook", "Leave"], ["Handbook", "Leave", "Sick leave"], ["Handbook", "Expenses"]]
    assert "Call in before nine." in sections[2][1] and "10 | full" in sections[2][1]
    _assert_sections_cover(doc)


def test_csv_and_tsv_columns_are_configurable(tmp_path):
    (tmp_path / "faq.csv").write_text('key,body,topic\nq1,"How do I reset, quickly?",account\nq2,Where are invoices?,billing\n')
    docs = _read(tmp_path / "faq.csv", text_column="body", id_column="key")
    assert [(d.id, d.text) for d in docs] == [("q1", "How do I reset, quickly?"), ("q2", "Where are invoices?")]
    assert docs[1].metadata["topic"] == "billing" and docs[1].metadata["source"] == "faq.csv" and docs[1].metadata["format"] == "csv"

    (tmp_path / "notes.tsv").write_text("id\ttext\ttitle\nn1\tTabs separate these cells.\tTabs\n")
    [doc] = _read(tmp_path / "notes.tsv")  # defaults: text, id, title
    assert (doc.id, doc.text, doc.metadata["title"]) == ("n1", "Tabs separate these cells.", "Tabs")

    (tmp_path / "noid.csv").write_text("text\nfirst row\nsecond row\n")
    assert [d.id for d in _read(tmp_path / "noid.csv")] == ["noid.csv#1", "noid.csv#2"]  # no id column: path#row

    with pytest.raises(UnreadableFileError, match=r"faq.csv: line 2: no 'text' field \(fields: key, body, topic\)"):
        _read(tmp_path / "faq.csv")


def test_jsonl_in_mark_and_beir_formats_and_json_lists(tmp_path):
    mark = [{"id": "a", "text": "Alpha text.", "metadata": {"lang": "en"}}, {"id": 7, "text": "Seven."}]
    (tmp_path / "mark.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mark) + "\n")
    docs = _read(tmp_path / "mark.jsonl")
    assert [(d.id, d.text) for d in docs] == [("a", "Alpha text."), ("7", "Seven.")]
    assert docs[0].metadata["lang"] == "en" and docs[0].metadata["format"] == "jsonl"

    beir = [{"_id": "d1", "title": "Bread", "text": "Knead the dough."}, {"_id": "d2", "title": "", "text": "Untitled."}]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in beir))
    docs = _read(tmp_path / "corpus.jsonl")
    assert [(d.id, d.text) for d in docs] == [("d1", "Bread Knead the dough."), ("d2", "Untitled.")]  # as BEIR encodes it
    assert docs[0].metadata["title"] == "Bread"

    (tmp_path / "list.json").write_text(json.dumps(mark))
    assert [d.id for d in _read(tmp_path / "list.json")] == ["a", "7"]


def test_parquet_and_datasets_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = {"id": ["p1", "p2"], "text": ["Parquet row one.", "Parquet row two."], "year": [2020, 2021]}
    pq.write_table(pa.table(rows), tmp_path / "rows.parquet")
    docs = _read(tmp_path / "rows.parquet")
    assert [(d.id, d.text, d.metadata["year"]) for d in docs] == [("p1", "Parquet row one.", 2020), ("p2", "Parquet row two.", 2021)]

    Dataset.from_dict({"doc": ["h1", "h2"], "content": ["Hub row one.", "Hub row two."]}).save_to_disk(str(tmp_path / "corpus" / "hub"))
    sources = list(iter_source_files(tmp_path / "corpus"))
    assert [s.rel_id for s in sources] == ["hub"]  # the saved folder is one source, not its arrow files
    docs = read_source_file(sources[0], ReaderOptions(text_column="content", id_column="doc"))
    assert [(d.id, d.text) for d in docs] == [("h1", "Hub row one."), ("h2", "Hub row two.")]
    assert docs[0].metadata["format"] == "datasets" and docs[0].metadata["source"] == "hub"


def test_ids_metadata_order_and_globs(tmp_path):
    root = tmp_path / "kb"
    for rel in ("b.md", "a.txt", "guide/z.html", "guide/drafts/wip.md", ".hidden/secret.md", "guide/logo.png", ".notes.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {Path(rel).stem}\n\nText of {rel}.\n" if not rel.endswith(".html") else HTML_PAGE)
    ids = [s.rel_id for s in iter_source_files(root)]
    assert ids == ["a.txt", "b.md", "guide/drafts/wip.md", "guide/z.html"]  # sorted; hidden and unsupported skipped
    assert [s.rel_id for s in iter_source_files([root], include="*.md")] == ["b.md", "guide/drafts/wip.md"]
    assert [s.rel_id for s in iter_source_files([root], exclude=["drafts/*", "**/drafts/*", "*.html"])] == ["a.txt", "b.md"]
    assert [s.rel_id for s in iter_source_files([root / "guide", root / "guide" / "z.html"])] == ["drafts/wip.md", "z.html"]

    [doc] = read_files(root / "a.txt")
    data = (root / "a.txt").read_bytes()
    assert doc.id == "a.txt" and doc.text == data.decode()
    meta = doc.metadata
    assert meta["source"] == "a.txt" and meta["format"] == "text" and meta["title"] == "a"
    assert meta["content_hash"] == hashlib.sha256(data).hexdigest()
    assert meta["mtime"] == pytest.approx((root / "a.txt").stat().st_mtime)
    assert "sections" not in meta  # plain text has no headings

    with pytest.raises(DataError, match="missing: no such file or folder"):
        list(iter_source_files(tmp_path / "missing"))
    (root / "guide" / "a.txt").write_text("same id from another root")
    with pytest.raises(DataError, match="'a.txt' comes from both"):
        read_files([root / "a.txt", root / "guide" / "a.txt"])


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("blob.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR", r"binary data \(NUL bytes\) under a text extension"),
        ("page.html", b"<html>\x00\x01\x02</html>", "binary data"),
        ("latin.md", "caf\u00e9 cr\u00e8me".encode("latin-1"), r"not UTF-8 text \(invalid continuation byte at byte 3\)"),
        ("empty.md", b"  \n\n ", "no text"),
        ("scripts.html", b"<html><body><script>var a = 1;</script><nav>Home</nav></body></html>", "no text"),
        ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "not a readable PDF"),
        ("broken.docx", b"PK\x03\x04 not a zip", "not a readable DOCX"),
        ("bad.jsonl", b'{"id": "a", "text": "fine"}\n{"id": "b", "text": \n', r"line 2: invalid JSON \(Expecting value at column 21\)"),
        ("dup.jsonl", b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "line 2: duplicate document id 'a' \\(first at line 1\\)"),
        ("blank.jsonl", b'{"id": "a", "text": "  "}\n', "line 1: empty text"),
        ("rows.parquet", b"PAR1 garbage", "not a readable parquet file"),
        ("slides.key", b"keynote", "unsupported file type '.key'"),
    ],
)
def test_unreadable_files_are_one_line_naming_file_and_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UnreadableFileError, match=f"{name}: {reason}") as err:
        _read(tmp_path / name)
    assert "\n" not in str(err.value) and err.value.path == str(tmp_path / name)
    assert isinstance(err.value, DataError)
