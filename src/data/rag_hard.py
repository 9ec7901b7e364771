"""A harder retrieval set for the sample corpus: the questions of ``rag_eval`` reworded so they
share (almost) no word with the document that answers them.

``rag_eval.jsonl``'s questions are built from the API summaries, so they reuse the
document's own words and BM25 alone finds most answers (recall@1 about 0.95). Users ask in
their own words. :func:`build_hard_rag_eval` rewrites each question word by word with a
fixed, hand-written paraphrase table (``return`` -> ``hand back``, ``socket`` -> ``network
endpoint``, ...) and keeps a question only when, after rewording, at most
``MAX_SHARED_WORDS`` of its content words, and no more than ``MAX_SHARED_FRACTION`` of
them, still occur in its answer document (the
question's template words such as "How do I" are not content). The result is the
``rag_eval_hard.jsonl`` of the sample data: same ``{query, relevant_docs, source}``
records, deterministic (no randomness; same input, same bytes), a set on which neither
keyword nor dense search wins everywhere.
"""

from __future__ import annotations

import re
from typing import Sequence

MAX_SHARED_WORDS = 2
MAX_SHARED_FRACTION = 0.5
MIN_CONTENT_WORDS = 2

# Words of the question templates and function words: not content, never counted as shared.
_FUNCTION_WORDS = frozenset("""
a an the of to in for and or is are be been by with from on as at it its this that these those which what how do
does i can get whether if into when not where explained class use check there their them they then than so such
via any all some each one me my you your we our us was were will would should could may might must has have had
like but up over out between most without while more after until other only both no just also than into about
""".split())

# Paraphrases of the frequent content words of the sample questions (lower case; a value
# may be several words). Chosen by hand to mean the same to a person, not to match a document.
PARAPHRASES: dict[str, str] = {
    "return": "hand over", "returns": "hands over", "returned": "handed over", "returning": "handing over",
    "given": "provided", "object": "specimen", "objects": "specimens", "file": "disk record", "files": "disk records",
    "string": "character run", "strings": "character runs", "data": "facts", "message": "note",
    "messages": "notes", "list": "sequence", "lists": "sequences", "name": "label", "names": "labels",
    "function": "routine", "functions": "routines", "header": "preamble line", "headers": "preamble lines",
    "bytes": "octets", "byte": "octet", "type": "kind", "set": "configure", "number": "figure", "base": "foundation",
    "test": "trial", "tests": "trials", "path": "route on disk", "paths": "routes on disk", "called": "invoked",
    "create": "make", "creates": "makes", "exception": "error condition", "context": "surroundings",
    "module": "library unit", "parse": "decode the structure of", "socket": "network endpoint",
    "raised": "thrown", "raise": "throw", "line": "row", "lines": "rows", "time": "moment",
    "output": "printed result", "code": "program text", "value": "quantity", "values": "quantities",
    "text": "wording", "found": "located", "current": "present", "containing": "holding", "node": "vertex",
    "request": "ask", "handler": "responder", "write": "store", "writes": "stores", "specified": "requested",
    "format": "layout", "read": "load", "reads": "loads", "single": "lone", "send": "transmit",
    "sends": "transmits", "connection": "link", "add": "append", "adds": "appends", "tree": "hierarchy",
    "wrapper": "shim", "abstract": "generic", "process": "live job", "server": "daemon",
    "event": "occurrence", "method": "member routine", "host": "machine", "representation": "rendering",
    "directory": "folder", "directories": "folders", "first": "initial", "http": "web", "loop": "cycle",
    "address": "location", "start": "begin", "starts": "begins", "binary": "non-text", "document": "page",
    "fragment": "piece", "system": "platform", "command": "instruction", "commands": "instructions",
    "response": "reply", "run": "execute", "runs": "executes", "version": "release number",
    "compile": "translate to bytecode", "tuple": "fixed-size record", "tuples": "fixed-size records",
    "error": "mishap", "errors": "mishaps", "methods": "member routines", "find": "locate",
    "finds": "locates", "decorator": "wrapping annotation", "mapping": "dictionary-like table",
    "default": "fallback", "close": "shut", "closes": "shuts", "open": "access", "opens": "accesses",
    "package": "bundle", "end": "finish", "manager": "supervisor", "buffer": "memory area",
    "buffers": "memory areas", "level": "tier", "input": "incoming data", "print": "show on screen",
    "namespace": "scope", "encode": "convert to bytes", "thread": "lightweight task", "threads": "lightweight tasks",
    "characters": "symbols", "character": "symbol", "update": "refresh", "execute": "carry out",
    "executes": "carries out", "sequence": "ordered series", "queue": "waiting line", "entries": "rows",
    "entry": "row", "retrieve": "fetch", "receive": "accept incoming", "properties": "attributes",
    "elements": "members", "element": "member", "url": "web link", "missing": "absent", "content": "body",
    "factory": "producer", "state": "condition", "call": "invoke", "calls": "invokes",
    "results": "upshots", "result": "upshot", "filename": "disk record label", "iterator": "stepper",
    "operation": "action", "random": "unpredictable", "transport": "carrier", "domain": "realm",
    "instance": "specimen", "xml": "markup", "stack": "pile", "new": "fresh", "block": "chunk",
    "generate": "produce", "generates": "produces", "mark": "flag", "loader": "importer",
    "apply": "employ", "alive": "still running", "logging": "journaling", "archive": "bundle of items",
    "ascii": "7-bit", "range": "span", "key": "lookup label", "keys": "lookup labels",
    "dictionary": "lookup table", "arguments": "parameters passed", "argument": "parameter passed",
    "formatted": "laid out", "mock": "fake stand-in", "wrapped": "enclosed", "headers": "preamble lines",
    "simple": "basic", "example": "sample", "scheme": "schema", "temporary": "short-lived",
    "classes": "types", "protocol": "wire convention", "uri": "resource identifier",
    "encoding": "character set", "delete": "erase", "remove": "take away", "removes": "takes away",
    "standard": "usual", "environment": "surroundings", "variable": "setting", "variables": "settings",
    "length": "size", "replace": "swap", "release": "let go of", "parameter": "setting",
    "shared": "common", "json": "javascript object notation", "exit": "quit", "extract": "pull out",
    "matching": "fitting", "port": "numbered endpoint", "contained": "held", "contains": "holds",
    "shell": "command interpreter", "pattern": "template", "stream": "flow", "attribute": "property",
    "stop": "halt", "coroutine": "async routine", "email": "electronic mail", "parser": "decoder",
    "signal": "notification", "frame": "activation record", "hook": "callback point",
    "zone": "region", "suite": "collection of trials", "map": "associate", "perform": "carry out",
    "cleanup": "tidying", "member": "constituent", "channel": "conduit", "ftp": "file-transfer",
    "subclass": "derived type", "date": "calendar day", "handle": "deal with", "year": "twelve months",
    "month": "calendar period", "day": "24 hours", "every": "each and every", "register": "enrol",
    "main": "primary", "compare": "contrast", "mailbox": "mail store", "datagram": "packet",
    "generator": "lazy producer", "size": "magnitude", "callback": "hook function", "timeout": "deadline",
    "child": "descendant", "memory": "ram", "target": "destination", "debugger": "bug hunter",
    "internal": "private", "statement": "clause", "profiler": "performance meter", "decode": "unpack",
    "copy": "duplicate", "integer": "whole number", "warning": "caution", "invalid": "malformed",
    "width": "breadth", "syntax": "grammar", "trace": "follow", "parent": "ancestor",
    "close": "shut", "closed": "shut", "unicode": "international text", "reading": "loading",
    "source": "origin", "find": "locate", "os": "operating platform", "csv": "comma-separated",
    "token": "lexical unit", "tokens": "lexical units", "socket": "network endpoint", "date": "calendar day",
    "python": "the language", "unix": "posix", "local": "nearby", "remote": "far-away", "user": "person",
    "password": "secret phrase", "lock": "mutex", "locks": "mutexes", "task": "job", "tasks": "jobs",
    "future": "pending result", "futures": "pending results", "pipe": "conduit", "buffering": "staging",
    "hash": "digest", "number": "figure", "numbers": "figures", "call": "invoke", "filter": "sieve",
    "sort": "order", "sorted": "ordered", "object": "specimen", "empty": "vacant", "count": "tally",
    "item": "piece", "items": "pieces", "index": "position", "position": "offset within",
}

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_'-]*")
_TOKEN = re.compile(r"[a-z0-9]+")


def _stem(word: str) -> str:
    """A crude stem (lower case, common suffixes off) so that ``files`` and ``file`` count as one word."""
    word = word.lower()
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def paraphrase(question: str) -> str:
    """``question`` with every word found in :data:`PARAPHRASES` replaced (case of the first letter kept)."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        new = PARAPHRASES.get(word.lower())
        if new is None:
            return word
        return new[:1].upper() + new[1:] if word[:1].isupper() else new

    return _WORD.sub(swap, question)


def content_words(text: str) -> set[str]:
    """The stems of ``text``'s words that are not function or template words."""
    return {_stem(w) for w in _TOKEN.findall(text.lower()) if w not in _FUNCTION_WORDS and len(w) > 1}


def build_hard_rag_eval(rag_eval: Sequence[dict], documents: Sequence[dict]) -> list[dict]:
    """Paraphrased ``rag_eval`` records (``{query, relevant_docs, source}``) whose question shares
    at most ``MAX_SHARED_WORDS`` (and ``MAX_SHARED_FRACTION``) content words with its relevant documents and keeps at least
    ``MIN_CONTENT_WORDS`` content words; in ``rag_eval``'s order."""
    vocabulary = {doc["id"]: content_words(doc["text"]) for doc in documents}
    out: list[dict] = []
    seen: set[str] = set()
    for record in rag_eval:
        question = paraphrase(record["query"])
        words = content_words(question)
        answer_words = set().union(*(vocabulary.get(d, set()) for d in record["relevant_docs"]))
        shared = len(words & answer_words)
        if len(words) < MIN_CONTENT_WORDS or shared > min(MAX_SHARED_WORDS, MAX_SHARED_FRACTION * len(words)) or question.lower() in seen:
            continue
        seen.add(question.lower())
        out.append({"query": question, "relevant_docs": list(record["relevant_docs"]), "source": record.get("source", "")})
    return out
