"""Issue 22's walkthrough, as the README shows it: ``mark ingest`` on a folder of HTML, Markdown
and PDF files (made here), then ``python -m src.api.main`` answers ``/rag-search`` and ``/query``
from them, with each hit's source file and heading path. Real subprocesses, a real server on
loopback, the real MiniLM encoder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api.fixtures import REPO, RunningServer, tiny_checkpoints  # noqa: F401
from tests.conftest import write_pdf

HTML = """<!doctype html><html><head><title>Installing Coralbase</title><script>var tracker = 1;</script></head>
<body>
<nav><a href="/">Home</a> | <a href="/blog">Blog</a> | <a href="/pricing">Pricing and newsletter signup</a></nav>
<aside class="sidebar"><h3>Related</h3><p>Subscribe to the newsletter for weekly pricing updates.</p></aside>
<main><article>
<h1>Installing Coralbase</h1>
<p>Coralbase is a small document database that keeps every record in a single append-only file.</p>
<h2>From source</h2>
<p>To build Coralbase from source, clone the repository and run the make install command, which compiles
the storage engine and copies the coralctl binary into the user's local bin folder.</p>
<h2>Upgrading</h2>
<p>An upgrade keeps the data file: stop the server, replace the binary and start it again; the journal is
replayed at start-up.</p>
</article></main>
<footer>Copyright Coralbase authors. Privacy policy.</footer>
</body></html>
"""

MARKDOWN = """# Backups

Coralbase writes a snapshot of the data file every night at two o'clock.

## Restoring a snapshot

To restore a snapshot, stop the server and run coralctl restore with the snapshot's date; the
current data file is renamed, never deleted.
"""


@pytest.fixture(scope="module")
def ingested(tiny_checkpoints: Path, tmp_path_factory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("walkthrough")
    docs = root / "mydocs"
    (docs / "guide").mkdir(parents=True)
    (docs / "guide" / "install.html").write_text(HTML)
    (docs / "backups.md").write_text(MARKDOWN)
    write_pdf(docs / "report.pdf", [
        ["Quarterly report", "Coralbase served 40 million reads in the quarter."],
        ["Incidents", "One outage: the disk of the primary filled up and writes were refused for an hour."],
    ], title="Quarterly report")
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "mamba").symlink_to(tiny_checkpoints / "mamba", target_is_directory=True)
    done = subprocess.run(
        [sys.executable, "-m", "src.training.orchestrator", "ingest", str(docs), "--index", str(checkpoints / "rag"), "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    server = RunningServer(checkpoints, root / "server.log", wait_for=("mamba", "rag"))
    yield {"server": server, "ingest_output": done.stdout + done.stderr}
    server.stop()


def _post(server: RunningServer, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_ingest_reports_every_file(ingested):
    # install.html, backups.md and the PDF's two pages: 4 documents added, none skipped
    assert "4 added, 0 updated, 0 deleted, 0 unchanged, 0 file(s) skipped; 4 documents" in ingested["ingest_output"], \
        ingested["ingest_output"][-2000:]


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_rag_search_finds_each_format_with_its_source_and_heading_path(ingested, mode):
    server = ingested["server"]
    hit = _post(server, "/rag-search", {"query": "how do I build Coralbase from source with make install?", "top_k": 2, "mode": mode})["results"][0]
    assert hit["doc_id"] == "guide/install.html" and hit["source"] == "guide/install.html"
    assert hit["heading_path"][:1] == ["Installing Coralbase"]
    assert "newsletter" not in hit["text"] and "tracker" not in hit["text"]  # navigation, sidebar and scripts dropped
    hit = _post(server, "/rag-search", {"query": "restore a snapshot with coralctl", "top_k": 2, "mode": mode})["results"][0]
    assert hit["doc_id"] == "backups.md" and hit["heading_path"] == ["Backups", "Restoring a snapshot"]
    hit = _post(server, "/rag-search", {"query": "outage when the disk of the primary filled up", "top_k": 2, "mode": mode})["results"][0]
    assert hit["doc_id"] == "report.pdf#p2" and hit["source"] == "report.pdf"


def test_query_answers_from_the_ingested_files(ingested):
    body = _post(ingested["server"], "/query", {"query": "How do I restore a snapshot?", "top_k": 2, "max_new_tokens": 8})
    assert body["sources"][0]["doc_id"] == "backups.md"
    assert body["sources"][0]["heading_path"] == ["Backups", "Restoring a snapshot"]
    assert any("coralctl restore" in e["sentence"] for e in body["evidence"])
    assert isinstance(body["answer"], str)


def test_evidence_sentences_follow_the_text_not_its_line_breaks():
    from src.api.service import split_sentences

    text = ("## Restoring a snapshot\n\nTo restore a snapshot, stop the server and run coralctl restore with the\n"
            "snapshot's date; the current data file is renamed. Never deleted!\n\n- first item of a list\n- second item of it\n"
            "| a table | row |\n\nshort.")
    assert split_sentences(text) == [
        "To restore a snapshot, stop the server and run coralctl restore with the snapshot's date; the current data file is renamed.",
        "Never deleted!", "- first item of a list", "- second item of it", "| a table | row |",
    ]


def test_evidence_shortlist_keeps_the_sentences_sharing_most_query_words_in_order():
    from src.api.service import lexical_shortlist

    candidates = [("a", "Nothing in common here."), ("a", "Restore the snapshot."), ("b", "The snapshot date."),
                  ("b", "Restore a snapshot by date."), ("c", "Unrelated words again.")]
    # shared terms with "restore snapshot date": 0, 2, 2, 3, 0 -> the best three, in their order
    assert lexical_shortlist("How to restore a snapshot by date?", candidates, 3) == candidates[1:4]
    assert lexical_shortlist("How to restore a snapshot by date?", candidates, 1) == [candidates[3]]
    # ties keep retrieval order; a short list is kept whole
    assert lexical_shortlist("zebra", candidates, 2) == candidates[:2]
    assert lexical_shortlist("zebra", candidates[:2], 5) == candidates[:2]
