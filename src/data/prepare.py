"""MARK's built-in sample corpus, made from the installed Python standard library's docstrings.

Every machine that runs MARK has a Python, and every Python carries the documentation of
its standard library: real English text about real topics, available offline. This module
imports a fixed, curated list of pure-Python stdlib modules, reads their module, class,
method and function docstrings with ``inspect``, and writes one JSONL file per data
format MARK trains on (see ``data/README.md`` for what each file holds):

    documents.jsonl                     {id, text, metadata}     one document per module
    lm_train.jsonl, lm_val.jsonl        {id, text, metadata}     documents split ~90/10
    classification_{train,val,test}.jsonl {text, label}          docstring -> module topic
    labels.json                         ordered label names
    rag_eval.jsonl                      {query, relevant_docs}   question -> module document
    rag_eval_hard.jsonl                 {query, relevant_docs}   the questions reworded away from the
                                                                 documents' words (src/data/rag_hard.py)
    sft_{train,val,test}.jsonl          {prompt, response}       "What does X do?" -> summary, and
                                                                 grounded "Context: ... Question: ... Answer:" -> summary
    preferences_{train,val,test}.jsonl  {prompt, chosen, rejected}
    manifest.json                       generator/Python version, per-file counts and sha256

The output is deterministic: the same Python on the same platform writes byte-identical
files (everything is sorted or ordered by a SHA-256 of a name; no timestamps). Run it with
``python -m src.data.prepare [--output-dir DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from src.core.cli import run_cli
from src.core.errors import DataError
from src.core.logging import get_logger, setup_logging
from src.data.prompts import Passage, grounded_prompt, select_passages
from src.data.rag_hard import build_hard_rag_eval
from src.data.readers import (
    ClassificationExample,
    Document,
    PreferenceExample,
    RagEvalExample,
    SFTExample,
    Record,
    read_classification,
    read_documents,
    read_preferences,
    read_rag_eval,
    read_sft,
)

# Bump when the output for a given Python changes, so existing data is rebuilt.
GENERATOR_VERSION = 4  # 2: sft/preferences test splits; 3: retrieval-grounded SFT/preference examples; 4: rag_eval_hard
SOURCE = "python-stdlib-docstrings"

# The classification labels, in index order.
LABELS: tuple[str, ...] = ("text_and_data", "networking_and_web", "system_and_concurrency")

# Curated, pure-Python modules that import cleanly (no GUI, no output, no platform-only
# module) on CPython 3.10 to 3.13. Each belongs to one topic; the first three topics are
# the classification labels, the last two only contribute documents and SFT/RAG examples.
_MODULES_BY_CATEGORY: dict[str, str] = {
    "text_and_data": """
        base64 codecs configparser copyreg csv dbm dbm.dumb difflib gettext gzip bz2 html
        html.parser json json.decoder json.encoder lzma netrc pickle pickletools plistlib
        pprint quopri re reprlib shelve shlex string stringprep struct tarfile textwrap wave
        xml.dom xml.dom.minidom xml.dom.pulldom xml.dom.xmlbuilder xml.dom.expatbuilder
        xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils xml.sax.xmlreader
        xml.sax.expatreader zipfile
    """,
    "networking_and_web": """
        email email.base64mime email.charset email.contentmanager email.encoders
        email.errors email.feedparser email.generator email.header email.headerregistry
        email.iterators email.message email.parser email.policy email.quoprimime email.utils
        ftplib http http.client http.cookiejar http.cookies http.server imaplib ipaddress
        mailbox mimetypes poplib selectors smtplib socket socketserver ssl urllib.error
        urllib.parse urllib.request urllib.response urllib.robotparser wsgiref.handlers
        wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate xmlrpc.client
        xmlrpc.server
    """,
    "system_and_concurrency": """
        asyncio.base_events asyncio.base_futures asyncio.coroutines asyncio.events
        asyncio.exceptions asyncio.format_helpers asyncio.futures asyncio.locks
        asyncio.protocols asyncio.queues asyncio.runners asyncio.selector_events
        asyncio.sslproto asyncio.staggered asyncio.streams asyncio.subprocess asyncio.tasks
        asyncio.threads asyncio.transports asyncio.trsock concurrent.futures
        concurrent.futures.process concurrent.futures.thread filecmp fileinput fnmatch glob
        multiprocessing.connection multiprocessing.context multiprocessing.heap
        multiprocessing.managers multiprocessing.pool multiprocessing.process
        multiprocessing.reduction multiprocessing.shared_memory multiprocessing.spawn
        multiprocessing.util os pathlib platform queue sched shutil signal subprocess
        sysconfig tempfile threading tracemalloc
    """,
    "language_and_tools": """
        abc argparse ast bdb cmd code codeop compileall contextlib copy dataclasses dis
        doctest enum functools getopt importlib importlib.abc importlib.metadata
        importlib.util inspect keyword linecache logging logging.config logging.handlers
        modulefinder operator optparse pdb pkgutil profile pstats py_compile pyclbr runpy
        symtable tabnanny timeit token tokenize trace traceback types typing unittest.case
        unittest.loader unittest.main unittest.mock unittest.result unittest.runner
        unittest.suite unittest.util venv warnings weakref zipapp zipimport
    """,
    "math_and_collections": """
        bisect calendar collections collections.abc fractions graphlib hashlib heapq hmac
        numbers random secrets statistics uuid zoneinfo
    """,
}
MODULE_CATEGORIES: dict[str, str] = {
    name: category for category, names in _MODULES_BY_CATEGORY.items() for name in names.split()
}

# Output file names, keyed by the names prepare_sample_data returns.
DATA_FILES: dict[str, str] = {
    "documents": "documents.jsonl",
    "lm_train": "lm_train.jsonl",
    "lm_val": "lm_val.jsonl",
    "classification_train": "classification_train.jsonl",
    "classification_val": "classification_val.jsonl",
    "classification_test": "classification_test.jsonl",
    "labels": "labels.json",
    "rag_eval": "rag_eval.jsonl",
    "rag_eval_hard": "rag_eval_hard.jsonl",
    "sft_train": "sft_train.jsonl",
    "sft_val": "sft_val.jsonl",
    "sft_test": "sft_test.jsonl",
    "preferences_train": "preferences_train.jsonl",
    "preferences_val": "preferences_val.jsonl",
    "preferences_test": "preferences_test.jsonl",
}
MANIFEST_FILE = "manifest.json"

# Sizes of the derived sets.
MIN_DOCUMENT_CHARS = 600
LM_VAL_FRACTION = 0.1
MIN_EXAMPLE_CHARS = 60
MAX_EXAMPLE_CHARS = 1200
MAX_EXAMPLES_PER_MODULE = 30  # so that a few large modules don't dominate a label
CLASSIFICATION_SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
MAX_SUMMARY_CHARS = 300
MAX_RAG_QUERIES_PER_MODULE = 3
MAX_RAG_QUERIES = 400
MAX_SFT_EXAMPLES = 1500
SFT_VAL_FRACTION = 0.1  # val: selects checkpoints and tunes settings
SFT_TEST_FRACTION = 0.1  # test: reported, and nothing else
GROUNDED_EVERY = 3  # about one entry in 3 also gets a retrieval-grounded example
MAX_GROUNDED_EXAMPLES = 500
MAX_GROUNDED_SECTION_CHARS = 400  # only short sections: the prompt stays within the RLHF prompt budget
GENERIC_ANSWERS = (
    "It is part of the Python standard library.",
    "It does what its name says.",
    "It is an internal helper; you do not need to know what it does.",
    "It handles that for you automatically.",
)

log = get_logger("data")


# ---------------------------------------------------------------- reading the stdlib


@dataclasses.dataclass(frozen=True)
class ApiEntry:
    """One documented function, class, method or property of a stdlib module."""

    module: str
    qualname: str  # e.g. "JSONEncoder.encode"
    kind: str  # "function" | "class" | "method" | "property"
    signature: str  # "(obj, *, skipkeys=False, ...)" or "" when Python cannot tell
    doc: str  # cleaned docstring

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.qualname}"

    @property
    def heading(self) -> str:
        prefix = {"class": "class ", "property": "property "}.get(self.kind, "")
        return f"{prefix}{self.full_name}{self.signature}"


@dataclasses.dataclass(frozen=True)
class ModuleDoc:
    name: str
    category: str
    doc: str
    entries: tuple[ApiEntry, ...]


class _Elided:
    """Stands in for a default value whose repr is not stable text (objects, addresses)."""

    def __repr__(self) -> str:
        return "..."


_ELIDED = _Elided()
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _clean_doc(doc: Any) -> str:
    if not isinstance(doc, str):
        return ""
    return _ADDRESS.sub("", inspect.cleandoc(doc)).strip()


def _signature(obj: Any) -> str:
    """The call signature without annotations, with only literal defaults spelled out."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = []
    for param in sig.parameters.values():
        default = param.default
        if default is not inspect.Parameter.empty:
            literal = default is None or isinstance(default, (bool, int, float, str, bytes))
            if not literal or len(repr(default)) > 40:
                default = _ELIDED
        params.append(param.replace(annotation=inspect.Parameter.empty, default=default))
    text = str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
    return _ADDRESS.sub("", text)


def _owned_by(obj: Any, module_name: str) -> bool:
    """True when ``obj`` is defined in this module (or in one of its private submodules)."""
    owner = getattr(obj, "__module__", None)
    return isinstance(owner, str) and (owner == module_name or owner.startswith(module_name + "._"))


def _is_generated_class_doc(cls: type, doc: str) -> bool:
    """Docstrings Python writes itself (namedtuple, dataclass) or inherits from a base."""
    if doc.startswith(cls.__name__ + "(") and "\n" not in doc:
        return True
    return any(doc == _clean_doc(base.__doc__) for base in cls.__mro__[1:])


def _class_members(module_name: str, cls: type) -> Iterator[ApiEntry]:
    for attr in sorted(vars(cls)):
        if attr.startswith("_"):
            continue
        raw = vars(cls)[attr]
        if isinstance(raw, property):
            kind, target = "property", raw.fget
            doc = _clean_doc(raw.__doc__)
            signature = ""
        else:
            target = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
            if not inspect.isroutine(target):
                continue
            kind, doc = "method", _clean_doc(getattr(target, "__doc__", None))
            signature = _signature(target)
        if target is None or not doc:
            continue
        yield ApiEntry(module_name, f"{cls.__name__}.{attr}", kind, signature, doc)


def _module_entries(module: Any) -> list[ApiEntry]:
    entries: list[ApiEntry] = []
    seen: set[int] = set()
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or not _owned_by(obj, module.__name__) or id(obj) in seen:
            continue
        if getattr(obj, "__name__", attr) != attr:  # an alias: documented under its own name
            continue
        if inspect.isclass(obj):
            seen.add(id(obj))
            doc = _clean_doc(obj.__doc__)
            if doc and not _is_generated_class_doc(obj, doc):
                entries.append(ApiEntry(module.__name__, attr, "class", _signature(obj), doc))
            entries.extend(_class_members(module.__name__, obj))
        elif inspect.isroutine(obj):
            seen.add(id(obj))
            doc = _clean_doc(obj.__doc__)
            if doc:
                entries.append(ApiEntry(module.__name__, attr, "function", _signature(obj), doc))
    return entries


def read_stdlib_docs(modules: dict[str, str]) -> tuple[list[ModuleDoc], list[str]]:
    """Import ``modules`` (name -> category) in this process and read their docstrings.

    Returns the modules (sorted by name) and the names that could not be imported on
    this Python. What it reads depends on what this process has imported before:
    libraries patch the stdlib (torch replaces ``inspect.getfile``), so the corpus is
    built by ``collect_stdlib_docs``, which calls this in a fresh interpreter.
    """
    docs, missing = [], []
    for name in sorted(modules):
        try:
            # A module deprecated in a newer Python still has real docs; keep imports quiet.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # a stripped-down Python may lack e.g. ssl or lzma
            missing.append(name)
            continue
        docs.append(ModuleDoc(name, modules[name], _clean_doc(module.__doc__), tuple(_module_entries(module))))
    return docs, missing


def _print_stdlib_docs() -> None:
    """Child-process side of ``collect_stdlib_docs``: the docs as JSON on stdout."""
    if "torch" in sys.modules:  # it replaces inspect.getfile: the docs read would change
        raise RuntimeError("src.data.prepare's imports must not import torch")
    docs, missing = read_stdlib_docs(MODULE_CATEGORIES)
    payload = {"modules": [dataclasses.asdict(doc) for doc in docs], "missing": missing}
    sys.stdout.write(json.dumps(payload, ensure_ascii=True))


def collect_stdlib_docs() -> tuple[list[ModuleDoc], list[str]]:
    """The curated modules' docs, read in a fresh interpreter of this same Python.

    A fresh interpreter sees the stdlib as installed, whatever the calling process has
    imported (and patched) before, so the output depends only on the Python. Modules
    that cannot be imported are logged and left out.
    """
    repo_root = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {repo_root!r}); from src.data.prepare import _print_stdlib_docs; _print_stdlib_docs()"
    # -E -s: ignore PYTHON* variables and the user's site-packages, which could change what is read.
    result = subprocess.run([sys.executable, "-E", "-s", "-c", code], capture_output=True, text=True, encoding="utf-8")
    if result.returncode != 0:
        raise RuntimeError(f"reading the stdlib docstrings failed:\n{result.stderr[-2000:]}")
    payload = json.loads(result.stdout)
    docs = [
        ModuleDoc(m["name"], m["category"], m["doc"], tuple(ApiEntry(**entry) for entry in m["entries"]))
        for m in payload["modules"]
    ]
    for name in payload["missing"]:
        log.warning("stdlib module %s is not importable on this Python; left out of the sample data", name)
    return docs, payload["missing"]


# ---------------------------------------------------------------- helpers


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _by_hash(items: Iterable[Any], key) -> list[Any]:
    return sorted(items, key=lambda item: (_stable_hash(key(item)), key(item)))


_ROLE = re.compile(r":[\w:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``")
_BACKTICKS = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_SIGNATURE_LINE = re.compile(r"^[\w.\[\]]+\(.*\)\s*(->.*)?$|->|=>")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def _plain(text: str) -> str:
    """reST markup removed, whitespace collapsed."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).find("~") >= 0 else m.group(1), text)
    text = _LITERAL.sub(r"\1", text)
    text = _BACKTICKS.sub(r"\1", text)
    text = _BOLD.sub(r"\1", text)
    return " ".join(text.split())


def summarize(doc: str, max_chars: int = MAX_SUMMARY_CHARS) -> str:
    """The leading sentence(s) of a docstring's first prose paragraph, at most ``max_chars``.

    Returns "" when the docstring has no usable summary (only a signature line, a
    deprecation note, a too-short or too-long first sentence).
    """
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.strip().splitlines()
        if not lines or _SIGNATURE_LINE.search(lines[0]):
            continue
        usage_line = lines[0][:1].islower() and lines[0].rstrip()[-1:] not in ".!?:,;"
        if usage_line and len(lines) > 1 and lines[1].strip()[:1].isupper():
            lines = lines[1:]  # a command's usage line, such as pdb's "unalias name"
            paragraph = "\n".join(lines)
        sentences = _SENTENCE_END.split(_plain(paragraph))
        summary = sentences[0]
        for sentence in sentences[1:]:
            if len(summary) + 1 + len(sentence) > max_chars:
                break
            summary = f"{summary} {sentence}"
        if summary[-1] not in ".!?":
            summary += "."
        words = summary.split()
        prose_words = sum(1 for word in words if word.strip(".,;:!?()'\"").isalpha())
        if (
            len(summary) > max_chars
            or len(words) < 4
            or prose_words < 0.7 * len(words)  # grammar rules, tables, code
            or "deprecated" in summary.lower()
        ):
            return ""
        return summary
    return ""


def _first_sentence(summary: str) -> str:
    return _SENTENCE_END.split(summary)[0].rstrip(".!?")


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text, re.IGNORECASE) is not None


def _lower_first(text: str) -> str:
    # Keep acronyms ("HTTP", "URL") as they are.
    if len(text) > 1 and text[1].isupper():
        return text
    return text[:1].lower() + text[1:]


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(None, 1)[0]
    return cut.rstrip() + " ..."


# ---------------------------------------------------------------- building the sets


def build_documents(modules: Sequence[ModuleDoc], python_version: str) -> list[dict]:
    """One document per module: its docstring, then a heading and docstring per API entry."""
    documents = []
    for module in modules:
        parts = [f"# {module.name}"]
        if module.doc:
            parts.append(module.doc)
        for entry in module.entries:
            parts.append(f"## {entry.heading}\n\n{entry.doc}")
        text = "\n\n".join(parts) + "\n"
        if len(text) < MIN_DOCUMENT_CHARS:
            continue
        metadata = {
            "module": module.name,
            "category": module.category,
            "source": SOURCE,
            "python_version": python_version,
        }
        documents.append({"id": module.name, "text": text, "metadata": metadata})
    return documents


def split_lm_documents(documents: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """About 90/10 at document level: the val set is the first 10% of documents by hashed id."""
    ranked = _by_hash(documents, key=lambda d: d["id"])
    n_val = max(1, round(len(ranked) * LM_VAL_FRACTION))
    val_ids = {d["id"] for d in ranked[:n_val]}
    train = [d for d in documents if d["id"] not in val_ids]
    val = [d for d in documents if d["id"] in val_ids]
    return train, val


def build_classification(modules: Sequence[ModuleDoc]) -> dict[str, list[dict]]:
    """Docstring -> the topic of the module it comes from, split by module 70/15/15.

    Examples are the docstrings (not their names) of functions, classes, methods and
    properties of the modules in the three labelled topics, at least ``MIN_EXAMPLE_CHARS``
    long, cut at ``MAX_EXAMPLE_CHARS``, deduplicated, at most ``MAX_EXAMPLES_PER_MODULE``
    per module. A module's examples all go to one split, so the test set measures how
    well a model generalises to modules it has not seen.
    """
    seen_texts: set[str] = set()
    per_module: dict[str, list[dict]] = {}
    for module in modules:
        if module.category not in LABELS:
            continue
        candidates = []
        for entry in module.entries:
            text = _truncate(entry.doc, MAX_EXAMPLE_CHARS)
            key = " ".join(text.split())
            if len(key) < MIN_EXAMPLE_CHARS or key in seen_texts:
                continue
            seen_texts.add(key)
            candidates.append({"text": text, "label": module.category, "_key": entry.full_name})
        chosen = _by_hash(candidates, key=lambda ex: ex["_key"])[:MAX_EXAMPLES_PER_MODULE]
        if chosen:
            per_module[module.name] = chosen

    splits: dict[str, list[dict]] = {name: [] for name, _ in CLASSIFICATION_SPLITS}
    for label in LABELS:
        # Greedy: each module (in hashed order) goes to the split furthest below its share.
        assigned = {name: 0 for name, _ in CLASSIFICATION_SPLITS}
        label_modules = _by_hash([m for m, exs in per_module.items() if exs[0]["label"] == label], key=str)
        for module_name in label_modules:
            examples = per_module[module_name]
            total = sum(assigned.values()) + len(examples)
            split = max(CLASSIFICATION_SPLITS, key=lambda s: s[1] * total - assigned[s[0]])[0]
            assigned[split] += len(examples)
            splits[split].extend({**ex, "_module": module_name} for ex in examples)
    for name in splits:
        splits[name] = _by_hash(splits[name], key=lambda ex: ex["_key"])
    return splits


# Words that start a declarative or descriptive sentence rather than an imperative verb.
_NOT_A_VERB = frozenset(
    """a an the this these that those it its if when while for in on with like is are was be
    can may must should will same as all each every one some no not only internal helper base
    abstract simple default new generic used called decorator wrapper class function method
    object instance iterator mixin""".split()
)


def _looks_imperative(word: str) -> bool:
    word = word.lower()
    return (
        word.isalpha()
        and word not in _NOT_A_VERB
        and not word.endswith(("ed", "ing", "ly"))
        and not (word.endswith("s") and not word.endswith("ss"))
    )


def _query_from_summary(entry: ApiEntry, sentence: str) -> str:
    """A question a user might ask, answered by this entry's documentation."""
    words = sentence.split()
    first = words[0].lower()
    lowered = _lower_first(sentence)
    if first in ("return", "returns") and len(words) > 2 and words[1].lower() == "true":
        rest = " ".join(words[3:] if len(words) > 3 and words[2] == "if" else words[2:])
        return f"How do I check whether {rest}?"
    if first in ("return", "returns"):
        return f"How do I get {' '.join(words[1:])}?"
    if entry.kind == "class" and first in ("a", "an"):
        return f"Which class is {lowered}?"
    if entry.kind == "class" and _looks_imperative(first):
        return f"Which class can I use to {lowered}?"
    if _looks_imperative(first):
        return f"How do I {lowered}?"
    if first.endswith("s") and first.isalpha() and first not in _NOT_A_VERB and not first.endswith("ss"):
        return f"What {lowered}?"
    return f"Where is it explained that {lowered}?"


def build_rag_eval(modules: Sequence[ModuleDoc], document_ids: set[str]) -> list[dict]:
    """Questions built from API summaries, each answered by its module's document.

    The entry's own name (and its class's name, for a method) never appears in the
    question, so retrieval cannot succeed by matching the identifier. A summary that
    occurs in more than one module is left out: its answer would be ambiguous.
    """
    modules_per_sentence: dict[str, set[str]] = {}
    candidates: list[tuple[ApiEntry, str]] = []
    for module in modules:
        for entry in module.entries:
            summary = summarize(entry.doc)
            if not summary:
                continue
            sentence = _first_sentence(summary)
            modules_per_sentence.setdefault(sentence.lower(), set()).add(module.name)
            if module.name not in document_ids or len(sentence.split()) < 5:
                continue
            query = _query_from_summary(entry, sentence)
            # The entry's name and its class's name (e.g. "Queue" and "get") must not appear.
            if any(_mentions(query, name) for name in entry.qualname.split(".")):
                continue
            candidates.append((entry, sentence, query))

    per_module: dict[str, list[dict]] = {}
    seen_queries: set[str] = set()
    for entry, sentence, query in _by_hash(candidates, key=lambda c: c[0].full_name):
        if len(modules_per_sentence[sentence.lower()]) > 1 or query.lower() in seen_queries:
            continue
        chosen = per_module.setdefault(entry.module, [])
        if len(chosen) < MAX_RAG_QUERIES_PER_MODULE:
            seen_queries.add(query.lower())
            chosen.append({"query": query, "relevant_docs": [entry.module], "source": entry.full_name})
    flat = [example for examples in per_module.values() for example in examples]
    return _by_hash(flat, key=lambda ex: ex["source"])[:MAX_RAG_QUERIES]


def _sft_prompt(entry: ApiEntry) -> str:
    if entry.kind in ("class", "property"):
        return f"What is {entry.full_name}?"
    return f"What does {entry.full_name} do?"


def build_sft_and_preferences(modules: Sequence[ModuleDoc], document_ids: set[str] | None = None) -> dict[str, list[dict]]:
    """SFT pairs ("What does json.dumps do?" -> its summary) and preference triples.

    The preference prompts are the SFT prompts. ``chosen`` is the right summary;
    ``rejected`` is, for about 80%, the summary of an entry of the same kind from another
    module (plausible but wrong), for about 10% the right summary cut short, and for about
    10% a generic non-answer. Splits are train/val/test 80/10/10 by answer (in hashed-name
    order): a prompt and its chosen answer are in exactly one split. About one entry in
    ``GROUNDED_EVERY`` also gets a retrieval-grounded example (:func:`grounded_examples`)
    with the same answer and rejected answer, right after its plain one and in its split.
    """
    entries = []
    seen_prompts: set[str] = set()
    for module in modules:
        for entry in module.entries:
            summary = summarize(entry.doc)
            prompt = _sft_prompt(entry)
            if summary and prompt not in seen_prompts:
                seen_prompts.add(prompt)
                entries.append((entry, prompt, summary))
    entries = _by_hash(entries, key=lambda e: e[0].full_name)[:MAX_SFT_EXAMPLES]

    pools: dict[str, list[tuple[ApiEntry, str]]] = {}
    for entry, _, summary in sorted(entries, key=lambda e: e[0].full_name):
        pools.setdefault("class" if entry.kind == "class" else "callable", []).append((entry, summary))

    # Split by answer, not by name: entries that share a docstring (an inherited method under
    # two classes) share a summary, and one of them in train would give the other's answer away.
    summaries = list(dict.fromkeys(summary for _, _, summary in entries))
    n_val = max(1, round(len(summaries) * SFT_VAL_FRACTION))
    n_test = max(1, round(len(summaries) * SFT_TEST_FRACTION))
    split_of = {
        summary: "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
        for rank, summary in enumerate(summaries)
    }
    out: dict[str, list[dict]] = {f"{kind}_{split}": [] for kind in ("sft", "preferences") for split in ("train", "val", "test")}
    # An entry's grounded example follows its plain one, in the split of its answer (the same
    # summary), so a file's first N examples (max_train_examples) hold both kinds.
    grounded = {entry.full_name: prompt for entry, prompt, _ in grounded_examples(entries, document_ids)}
    for entry, prompt, summary in entries:
        split = split_of[summary]
        rejected = _rejected_answer(entry, summary, pools)
        for p in (prompt, grounded.get(entry.full_name)):
            if p is not None:
                out[f"sft_{split}"].append({"prompt": p, "response": summary})
                out[f"preferences_{split}"].append({"prompt": p, "chosen": summary, "rejected": rejected})
    return out


def _section(entry: ApiEntry) -> str:
    # The entry's part of its module's document (build_documents), as a RAG chunk of it reads.
    return f"## {entry.heading}\n\n{entry.doc}"


def grounded_examples(entries: Sequence[tuple[ApiEntry, str, str]], document_ids: set[str] | None = None) -> list[tuple[ApiEntry, str, str]]:
    """``(entry, grounded prompt, summary)`` for about one in ``GROUNDED_EVERY`` of ``entries``
    (``(entry, prompt, summary)``) whose documentation section is short: a user's question
    (as in rag_eval) with, as context, the entry's section of its module's document, after or
    before (by hash) a same-kind entry's section from another module. The prompt is made by
    :func:`src.data.prompts.grounded_prompt` from :func:`select_passages`, exactly as the
    server's ``/query`` and the LangChain graph make theirs; the answer is the entry's summary.

    The passages come from the documents, not a FAISS index, so data preparation needs no
    trained encoder and stays fast and deterministic. ``document_ids``: the modules that have a
    document (and so RAG chunks); passages come only from those."""
    short = [e for e in entries if len(_section(e[0])) <= MAX_GROUNDED_SECTION_CHARS
             and (document_ids is None or e[0].module in document_ids)]
    ordered = sorted(short, key=lambda e: e[0].full_name)
    out = []
    for entry, _, summary in _by_hash(short, key=lambda e: "grounded:" + e[0].full_name):
        roll = _stable_hash("grounded:" + entry.full_name)
        if roll % GROUNDED_EVERY:
            continue
        # The distractor: the next short entry (in name order, from the hashed start) of another module.
        start = roll % len(ordered)
        distractor = next(
            (o for o, _, s in (ordered[(start + k) % len(ordered)] for k in range(len(ordered)))
             if o.module != entry.module and s != summary),
            None,
        )
        passages = [Passage(entry.module, _section(entry))]
        if distractor is not None:
            other = Passage(distractor.module, _section(distractor))
            passages = passages + [other] if (roll >> 8) % 2 else [other] + passages
        question = _query_from_summary(entry, _first_sentence(summary))
        out.append((entry, grounded_prompt(question, select_passages(passages)), summary))
        if len(out) >= MAX_GROUNDED_EXAMPLES:
            break
    return out


def _rejected_answer(entry: ApiEntry, summary: str, pools: dict[str, list[tuple[ApiEntry, str]]]) -> str:
    roll = _stable_hash("rejected:" + entry.full_name)
    words = summary.split()
    if roll % 100 < 15 and len(words) >= 8:
        return " ".join(words[: len(words) // 3]) + " ..."
    if 15 <= roll % 100 < 25:
        return GENERIC_ANSWERS[roll % len(GENERIC_ANSWERS)]
    pool = pools["class" if entry.kind == "class" else "callable"]
    start = roll % len(pool)
    for offset in range(len(pool)):
        other, other_summary = pool[(start + offset) % len(pool)]
        if other.module != entry.module and other_summary != summary:
            return other_summary
    return GENERIC_ANSWERS[roll % len(GENERIC_ANSWERS)]


# ---------------------------------------------------------------- writing


def _jsonl_bytes(records: Sequence[dict]) -> bytes:
    lines = [json.dumps(record, ensure_ascii=False, sort_keys=False) for record in records]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    # Bytes, not text: the files must be UTF-8 whatever the locale, and byte-identical.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _public(records: Sequence[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if not k.startswith("_")} for record in records]


def _runtime_identity() -> dict[str, str]:
    return {"python_version": platform.python_version(), "platform": sys.platform}


def _is_up_to_date(output_dir: Path) -> bool:
    manifest_path = output_dir / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    identity = _runtime_identity()
    return (
        isinstance(manifest, dict)
        and manifest.get("generator_version") == GENERATOR_VERSION
        and all(manifest.get(key) == value for key, value in identity.items())
        and all((output_dir / name).is_file() for name in DATA_FILES.values())
    )


def build_sample_data() -> tuple[dict[str, bytes], dict[str, Any]]:
    """Every output file's bytes, by file name, plus facts for the manifest."""
    python_version = platform.python_version()
    modules, missing = collect_stdlib_docs()
    documents = build_documents(modules, python_version)
    lm_train, lm_val = split_lm_documents(documents)
    classification = build_classification(modules)
    rag_eval = build_rag_eval(modules, {d["id"] for d in documents})
    sft_and_preferences = build_sft_and_preferences(modules, {d["id"] for d in documents})

    records: dict[str, list[dict]] = {
        "documents": documents,
        "lm_train": lm_train,
        "lm_val": lm_val,
        **{f"classification_{split}": _public(examples) for split, examples in classification.items()},
        "rag_eval": rag_eval,
        "rag_eval_hard": build_hard_rag_eval(rag_eval, documents),
        **sft_and_preferences,
    }
    files = {DATA_FILES[key]: _jsonl_bytes(value) for key, value in records.items()}
    files[DATA_FILES["labels"]] = (json.dumps(list(LABELS), indent=2) + "\n").encode("utf-8")
    counts = {DATA_FILES[key]: len(value) for key, value in records.items()}
    counts[DATA_FILES["labels"]] = len(LABELS)
    facts = {
        "modules_read": len(modules),
        "modules_missing": missing,
        "classification_modules": {
            split: sorted({ex["_module"] for ex in examples}) for split, examples in classification.items()
        },
        "counts": counts,
    }
    return files, facts


def prepare_sample_data(output_dir: str | Path = "data", force: bool = False) -> dict[str, Path]:
    """Write the sample corpus into ``output_dir`` unless it is already there.

    Nothing is rewritten when ``manifest.json`` says the files were made by this
    generator version on this Python and platform and all of them exist, unless
    ``force``. Files in ``output_dir`` that this generator did not write (no manifest)
    are never overwritten without ``force``: that is a ``DataError``.

    Returns the path of every file by key (``"documents"``, ``"lm_train"``, ...,
    ``"labels"``, ``"manifest"``).
    """
    output_dir = Path(output_dir)
    paths = {key: output_dir / name for key, name in DATA_FILES.items()}
    paths["manifest"] = output_dir / MANIFEST_FILE
    if not force and _is_up_to_date(output_dir):
        log.info("sample data in %s is up to date (use --force to rebuild)", output_dir)
        return paths
    if not force and not paths["manifest"].exists():
        foreign = sorted(name for name in DATA_FILES.values() if (output_dir / name).exists())
        if foreign:
            raise DataError(
                f"{output_dir}: {', '.join(foreign)} exist but were not written by prepare "
                "(no manifest.json); pass --force to overwrite them or choose another --output-dir"
            )

    started = time.perf_counter()
    files, facts = build_sample_data()
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_files = {}
    for name, data in files.items():
        _write_bytes_atomic(output_dir / name, data)
        manifest_files[name] = {
            "records": facts["counts"][name],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    manifest = {
        "generator": "src.data.prepare",
        "generator_version": GENERATOR_VERSION,
        **_runtime_identity(),
        "source": SOURCE,
        "labels": list(LABELS),
        "modules_read": facts["modules_read"],
        "modules_missing": facts["modules_missing"],
        "classification_modules": facts["classification_modules"],
        "files": manifest_files,
    }
    # The manifest goes last: a run that stops half-way leaves no up-to-date manifest.
    _write_bytes_atomic(paths["manifest"], (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    log.info(
        "wrote sample data to %s in %.1fs: %s",
        output_dir,
        time.perf_counter() - started,
        ", ".join(f"{name} {count}" for name, count in facts["counts"].items()),
    )
    return paths


# ---------------------------------------------------------------- validation


def _numbered_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of an already validated JSONL file."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield lineno, json.loads(line)


def _read_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except ValueError as err:
        raise DataError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise DataError(f"{path}: expected a non-empty JSON list of label names")
    if len(set(labels)) != len(labels):
        raise DataError(f"{path}: duplicate label names")
    return labels


def validate_data_files(output_dir: str | Path = "data", files: Iterable[str] | None = None) -> dict[str, int]:
    """Read every data file with MARK's readers and check the files agree with each other.

    ``files`` limits the check to some keys of ``DATA_FILES`` (default: all of them).
    Returns the number of records per file name. Raises ``DataError`` naming the file
    (and line) for a missing file, a malformed line, a classification label not in
    ``labels.json``, or a ``rag_eval`` document id that is not in ``documents.jsonl``.
    """
    output_dir = Path(output_dir)
    keys = list(DATA_FILES) if files is None else list(files)
    unknown = [key for key in keys if key not in DATA_FILES]
    if unknown:
        raise DataError(f"unknown data file key(s) {unknown}; known: {list(DATA_FILES)}")
    readers = {
        "documents": read_documents,
        "lm_train": read_documents,
        "lm_val": read_documents,
        "classification_train": read_classification,
        "classification_val": read_classification,
        "classification_test": read_classification,
        "rag_eval": read_rag_eval,
        "rag_eval_hard": read_rag_eval,
        "sft_train": read_sft,
        "sft_val": read_sft,
        "sft_test": read_sft,
        "preferences_train": read_preferences,
        "preferences_val": read_preferences,
        "preferences_test": read_preferences,
    }
    counts: dict[str, int] = {}
    labels: list[str] | None = None
    document_ids: set[str] | None = None
    for key in keys:
        path = output_dir / DATA_FILES[key]
        if key == "labels":
            labels = _read_labels(path)
            counts[path.name] = len(labels)
            continue
        records = readers[key](path)
        counts[path.name] = len(records)
        if key == "documents":
            document_ids = {doc.id for doc in records}

    if any(key.startswith("classification_") for key in keys):
        labels = labels if labels is not None else _read_labels(output_dir / DATA_FILES["labels"])
        for key in (k for k in keys if k.startswith("classification_")):
            path = output_dir / DATA_FILES[key]
            for lineno, obj in _numbered_objects(path):
                label = obj["label"]
                ok = (0 <= label < len(labels)) if isinstance(label, int) else label in labels
                if not ok:
                    raise DataError(f"{path}:{lineno}: label {label!r} is not one of {labels}")
    for key in (k for k in ("rag_eval", "rag_eval_hard") if k in keys):
        if document_ids is None:
            document_ids = {doc.id for doc in read_documents(output_dir / DATA_FILES["documents"])}
        path = output_dir / DATA_FILES[key]
        for lineno, obj in _numbered_objects(path):
            for doc_id in obj["relevant_docs"]:
                if str(doc_id) not in document_ids:
                    raise DataError(f"{path}:{lineno}: relevant doc {doc_id!r} is not in {DATA_FILES['documents']}")
    return counts


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.data.prepare",
        description="Write MARK's sample corpus (built from the Python standard library's docstrings).",
    )
    parser.add_argument("--output-dir", default="data", help="folder for the data files (default: data)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the files are up to date")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Prepare and validate the sample data; returns ``{"counts": ..., "outputs": ...}``."""
    args = build_parser().parse_args(argv)
    setup_logging("data")
    paths = prepare_sample_data(args.output_dir, force=args.force)
    counts = validate_data_files(args.output_dir)
    for name, count in counts.items():
        print(f"{count:6d}  {Path(args.output_dir) / name}")
    return {"counts": counts, "outputs": {key: str(path) for key, path in paths.items()}}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
