"""src/data/man_pages.py on hand-written manual pages (roff)."""

from __future__ import annotations

import gzip
from pathlib import Path

from src.data.man_pages import build_man_page_corpus, roff_to_sections

PAGE = r""".\" a comment
.TH FROB 1
.SH NAME
frob \- twist the knobs of a \fBwidget\fR
.SH DESCRIPTION
.B frob
turns every knob it finds \(em slowly.
.PP
Options follow.
.TP
\fB\-v\fR
be verbose
"""


def test_roff_to_sections():
    sections = dict(roff_to_sections(PAGE))
    assert sections["NAME"] == "frob - twist the knobs of a widget"
    assert sections["DESCRIPTION"] == "frob turns every knob it finds - slowly. Options follow. -v be verbose"


def test_corpus_from_a_man_folder(tmp_path: Path):
    folder = tmp_path / "man1"
    folder.mkdir()
    body = PAGE + "\n".join(f"Line {i} of text about knobs and widgets." for i in range(40))
    for name in ("frob", "twiddle"):
        text = body.replace("frob", name).replace("twist the knobs", "spin the dials" if name == "twiddle" else "twist the knobs")
        (folder / f"{name}.1.gz").write_bytes(gzip.compress(text.encode()))
    (folder / "alias.1.gz").write_bytes(gzip.compress(b".so man1/frob.1\n"))
    (folder / "knob.1.gz").write_bytes(gzip.compress(PAGE.replace("frob", "knob").encode() + b"\n" + b"x " * 300))
    documents, queries = build_man_page_corpus(["1"], root=tmp_path)
    assert sorted(d["id"] for d in documents) == ["frob.1", "knob.1", "twiddle.1"]  # the .so redirect is skipped
    assert all("NAME" not in d["text"] for d in documents)
    # frob and knob share a description (ambiguous: no query); twiddle's is its own
    assert queries == [{"query": "spin the dials of a widget", "relevant_docs": ["twiddle.1"], "source": "twiddle.1"}]
