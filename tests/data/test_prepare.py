"""The sample corpus: deterministic, the sizes we promise, sound splits, consistent files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from src.core.errors import DataError
from src.data.prepare import (
    DATA_FILES,
    GENERATOR_VERSION,
    LABELS,
    MANIFEST_FILE,
    ApiEntry,
    _query_from_summary,
    prepare_sample_data,
    read_stdlib_docs,
    summarize,
    validate_data_files,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _records(directory: Path, key: str) -> list[dict]:
    with open(directory / DATA_FILES[key], encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))


@pytest.fixture()
def data_copy(sample_data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the sample data that a test may change."""
    return Path(shutil.copytree(sample_data_dir, tmp_path / "data"))


def test_same_python_writes_byte_identical_files(sample_data_dir: Path, tmp_path: Path) -> None:
    # torch patches inspect.getfile on import; the corpus must not depend on that.
    pytest.importorskip("torch")
    second = tmp_path / "again"
    paths = prepare_sample_data(second)
    for name in list(DATA_FILES.values()) + [MANIFEST_FILE]:
        assert (second / name).read_bytes() == (sample_data_dir / name).read_bytes(), name
    assert set(paths) == set(DATA_FILES) | {"manifest"}


def test_counts_and_sizes_are_in_the_promised_ranges(sample_data_dir: Path) -> None:
    counts = validate_data_files(sample_data_dir)
    manifest = _manifest(sample_data_dir)
    assert counts == {name: entry["records"] for name, entry in manifest["files"].items()}

    assert 150 <= counts["documents.jsonl"] <= 250
    assert counts["lm_train.jsonl"] + counts["lm_val.jsonl"] == counts["documents.jsonl"]
    assert 0.07 <= counts["lm_val.jsonl"] / counts["documents.jsonl"] <= 0.13
    n_classification = sum(counts[f"classification_{s}.jsonl"] for s in ("train", "val", "test"))
    assert 500 <= n_classification <= 2000
    assert 200 <= counts["rag_eval.jsonl"] <= 500
    assert 800 <= sum(counts[f"sft_{s}.jsonl"] for s in ("train", "val", "test")) <= 2000
    for split in ("train", "val", "test"):
        assert counts[f"preferences_{split}.jsonl"] == counts[f"sft_{split}.jsonl"]
    assert 150 <= counts["sft_val.jsonl"] <= 240 and 150 <= counts["sft_test.jsonl"] <= 240
    assert counts["labels.json"] == 3

    total_bytes = sum(entry["bytes"] for entry in manifest["files"].values())
    assert total_bytes < 8 * 2**20
    assert manifest["generator_version"] == GENERATOR_VERSION
    assert manifest["python_version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")


def test_documents_are_long_real_module_docs(sample_data_dir: Path) -> None:
    documents = {d["id"]: d for d in _records(sample_data_dir, "documents")}
    json_doc = documents["json"]
    assert "JSON (JavaScript Object Notation)" in json_doc["text"]
    assert "## json.dumps(obj, *, skipkeys=False" in json_doc["text"]
    assert json_doc["metadata"] == {
        "module": "json",
        "category": "text_and_data",
        "source": "python-stdlib-docstrings",
        "python_version": _manifest(sample_data_dir)["python_version"],
    }
    lengths = sorted(len(d["text"]) for d in documents.values())
    assert lengths[len(lengths) // 2] > 2000  # median document: a couple of pages
    assert not any(" at 0x" in d["text"] for d in documents.values())  # no memory addresses
    assert list(documents) == sorted(documents)

    lm_ids = [d["id"] for d in _records(sample_data_dir, "lm_train") + _records(sample_data_dir, "lm_val")]
    assert sorted(lm_ids) == sorted(documents)


def test_classification_labels_each_have_a_real_share(sample_data_dir: Path) -> None:
    assert json.loads((sample_data_dir / "labels.json").read_text()) == list(LABELS)
    for split in ("train", "val", "test"):
        examples = _records(sample_data_dir, f"classification_{split}")
        shares = Counter(ex["label"] for ex in examples)
        assert set(shares) == set(LABELS), split
        for label in LABELS:
            assert shares[label] / len(examples) >= 0.15, (split, shares)
        assert all(len(ex["text"]) >= 60 for ex in examples)
    n_train = len(_records(sample_data_dir, "classification_train"))
    n_test = len(_records(sample_data_dir, "classification_test"))
    assert 0.55 <= n_train / (n_train + 2 * n_test) <= 0.85


def test_no_module_is_in_two_classification_splits(sample_data_dir: Path) -> None:
    listed = _manifest(sample_data_dir)["classification_modules"]
    assert not set(listed["train"]) & set(listed["val"])
    assert not set(listed["train"]) & set(listed["test"])
    assert not set(listed["val"]) & set(listed["test"])

    # Check it from the text too: find each example's module through the documents.
    documents = _records(sample_data_dir, "documents")
    found_modules: dict[str, set[str]] = {}
    n_found = n_total = 0
    for split in ("train", "val", "test"):
        found_modules[split] = set()
        for example in _records(sample_data_dir, f"classification_{split}"):
            n_total += 1
            text = example["text"].removesuffix(" ...")
            owner = next((d["id"] for d in documents if text in d["text"]), None)
            if owner is not None:
                n_found += 1
                found_modules[split].add(owner)
                assert owner in listed[split]
    assert n_found / n_total > 0.9
    assert not found_modules["train"] & found_modules["test"]


def test_rag_eval_points_at_real_documents_and_hides_names(sample_data_dir: Path) -> None:
    document_ids = {d["id"] for d in _records(sample_data_dir, "documents")}
    examples = _records(sample_data_dir, "rag_eval")
    assert len({ex["query"].lower() for ex in examples}) == len(examples)
    assert len({ex["relevant_docs"][0] for ex in examples}) >= 100  # spread over many documents
    for example in examples:
        assert example["relevant_docs"] and set(example["relevant_docs"]) <= document_ids
        module, qualname = example["relevant_docs"][0], example["source"][len(example["relevant_docs"][0]) + 1 :]
        assert example["source"].startswith(module + ".")
        for name in qualname.split("."):
            assert not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", example["query"], re.IGNORECASE), example


def test_sft_and_preferences_share_prompts_and_differ_in_the_right_way(sample_data_dir: Path) -> None:
    for split in ("train", "val", "test"):
        sft = _records(sample_data_dir, f"sft_{split}")
        preferences = _records(sample_data_dir, f"preferences_{split}")
        assert [ex["prompt"] for ex in sft] == [ex["prompt"] for ex in preferences]
        assert [ex["response"] for ex in sft] == [ex["chosen"] for ex in preferences]
        assert all(len(ex["response"]) <= 300 for ex in sft)
        assert all(ex["prompt"].startswith(("What does ", "What is ", "Context:\n")) for ex in sft)
        assert all(ex["chosen"] != ex["rejected"] for ex in preferences)
    train = _records(sample_data_dir, "preferences_train")
    all_summaries = {ex["chosen"] for ex in train}
    wrong_summaries = sum(ex["rejected"] in all_summaries for ex in train)
    assert wrong_summaries / len(train) > 0.6  # mostly another entry's real summary


def test_sft_and_preference_splits_are_disjoint(sample_data_dir: Path) -> None:
    """train / val / test share no prompt, and no chosen answer (the same summary under
    another name would leak the answer): val selects, test is only reported."""
    for kind, answer in (("sft", "response"), ("preferences", "chosen")):
        splits = {s: _records(sample_data_dir, f"{kind}_{s}") for s in ("train", "val", "test")}
        prompts = {s: {ex["prompt"] for ex in records} for s, records in splits.items()}
        assert all(len(prompts[s]) == len(splits[s]) for s in splits), "a prompt repeats inside a split"
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not prompts[a] & prompts[b], (kind, a, b)
        assert len(splits["test"]) >= 100 and len(splits["val"]) >= 100
        answers = {s: {ex[answer] for ex in records} for s, records in splits.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not answers[a] & answers[b], (kind, a, b)


def test_prepare_does_nothing_when_up_to_date_and_rebuilds_when_stale(data_copy: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in data_copy.iterdir()}
    prepare_sample_data(data_copy)
    assert {p.name: p.stat().st_mtime_ns for p in data_copy.iterdir()} == before

    manifest = _manifest(data_copy)
    manifest["generator_version"] = GENERATOR_VERSION - 1
    (data_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    (data_copy / "sft_val.jsonl").unlink()
    prepare_sample_data(data_copy)
    assert _manifest(data_copy)["generator_version"] == GENERATOR_VERSION
    assert validate_data_files(data_copy)["sft_val.jsonl"] > 0


def test_prepare_never_overwrites_files_it_did_not_write(tmp_path: Path) -> None:
    own = tmp_path / "documents.jsonl"
    own.write_text('{"id": "mine", "text": "my own corpus"}\n')
    with pytest.raises(DataError, match="documents.jsonl exist but were not written by prepare"):
        prepare_sample_data(tmp_path)
    assert own.read_text() == '{"id": "mine", "text": "my own corpus"}\n'


def test_cli_reports_counts_and_fails_in_one_line(data_copy: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "src.data.prepare", "--output-dir", str(data_copy)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(_records(data_copy, 'documents')):6d}  {data_copy / 'documents.jsonl'}" in done.stdout

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "rag_eval.jsonl").write_text("{}\n")
    command = [sys.executable, "-m", "src.data.prepare", "--output-dir", str(foreign)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_validate_names_file_and_line_of_bad_data(data_copy: Path) -> None:
    path = data_copy / "sft_train.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = '{"prompt": "What does x do?"'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sft_train\.jsonl:5: invalid JSON"):
        validate_data_files(data_copy)
    assert validate_data_files(data_copy, files=["documents", "rag_eval"])["rag_eval.jsonl"] > 0


def test_validate_checks_labels_and_document_ids_across_files(data_copy: Path) -> None:
    path = data_copy / "classification_val.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"text": "Some docstring text.", "label": "poetry"})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"classification_val\.jsonl:3: label 'poetry' is not one of"):
        validate_data_files(data_copy, files=["labels", "classification_val"])

    path = data_copy / "rag_eval.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[0] = json.dumps({"query": "How do I fly?", "relevant_docs": ["antigravity"]})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rag_eval\.jsonl:1: relevant doc 'antigravity' is not in documents\.jsonl"):
        validate_data_files(data_copy, files=["rag_eval"])

    (data_copy / "lm_val.jsonl").unlink()
    with pytest.raises(DataError, match=r"lm_val\.jsonl: data file not found"):
        validate_data_files(data_copy, files=["lm_val"])


def test_read_stdlib_docs_reads_signatures_and_docstrings() -> None:
    modules, missing = read_stdlib_docs({"json": "text_and_data", "no_such_module_xyz": "text_and_data"})
    assert missing == ["no_such_module_xyz"]
    (json_module,) = modules
    entries = {entry.qualname: entry for entry in json_module.entries}
    assert entries["dumps"].kind == "function"
    assert entries["dumps"].signature.startswith("(obj, *, skipkeys=False")
    assert "JSONEncoder" not in entries  # documented with json.encoder, where it is defined
    assert "Serialize ``obj`` to a JSON formatted ``str``." in entries["dumps"].doc


def test_summarize_takes_the_first_prose_sentences() -> None:
    doc = "dumps(obj) -> str\n\nSerialize ``obj`` to a JSON formatted :class:`str`.\n\nMore detail."
    assert summarize(doc) == "Serialize obj to a JSON formatted str."
    assert summarize("Deprecated alias of something else entirely.") == ""
    assert summarize("Too short.") == ""
    long_first = "Word " * 80 + "end."
    assert summarize(long_first) == ""


def test_queries_are_questions_in_plain_words() -> None:
    def entry(kind: str) -> ApiEntry:
        return ApiEntry("m", "thing", kind, "", "")

    assert _query_from_summary(entry("function"), "Return True if the path exists") == (
        "How do I check whether the path exists?"
    )
    assert _query_from_summary(entry("function"), "Return the size of a file") == "How do I get the size of a file?"
    assert _query_from_summary(entry("function"), "Copy data and mode bits") == "How do I copy data and mode bits?"
    assert _query_from_summary(entry("class"), "A parser for HTML text") == "Which class is a parser for HTML text?"
    assert _query_from_summary(entry("method"), "Sends data to the socket") == "What sends data to the socket?"


def test_grounded_examples_use_exactly_the_servers_prompt(sample_data_dir: Path) -> None:
    """Some SFT / preference examples are retrieval-grounded, built with the very function the
    server's /query and the LangChain graph call, from passages of the sample documents."""
    import src.api.service as service
    import src.integrations.graph as graph
    from src.data.prompts import is_grounded_prompt, parse_grounded_prompt

    # The server and the graph build their prompts with these functions, not copies of them.
    assert service.grounded_prompt is graph.grounded_prompt and service.select_passages is graph.select_passages
    documents = {d["id"]: " ".join(d["text"].split()) for d in _records(sample_data_dir, "documents")}
    for split in ("train", "val", "test"):
        sft = _records(sample_data_dir, f"sft_{split}")
        grounded = [ex for ex in sft if is_grounded_prompt(ex["prompt"])]
        assert 0.12 <= len(grounded) / len(sft) <= 0.35, split
        for ex in grounded:
            question, passages = parse_grounded_prompt(ex["prompt"])
            assert ex["prompt"] == service.grounded_prompt(question, service.select_passages(passages))
            assert ex["prompt"].startswith("Context:\n[") and ex["prompt"].endswith(f"\n\nQuestion: {question}\nAnswer:")
            assert len(passages) == 2 and passages[0].doc_id != passages[1].doc_id
            assert all(p.text in documents[p.doc_id] for p in passages)  # passages of the documents
            # The answer is in the context: it is its documentation section's summary.
            words = re.findall(r"[a-z0-9]+", ex["response"].lower())
            assert any(sum(w in set(re.findall(r"[a-z0-9]+", p.text.lower())) for w in words) >= 0.8 * len(words)
                       for p in passages)
    # Their answers follow the same train / val / test split as the plain examples.
    plain_answers = {s: {ex["response"] for ex in _records(sample_data_dir, f"sft_{s}") if not is_grounded_prompt(ex["prompt"])}
                     for s in ("train", "val", "test")}
    for s in ("train", "val", "test"):
        assert all(ex["response"] in plain_answers[s] for ex in _records(sample_data_dir, f"sft_{s}")
                   if is_grounded_prompt(ex["prompt"]))
