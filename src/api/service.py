"""What the HTTP routes call: the loaded models behind their batching workers.

:class:`ModelService` turns the registry's models into serving workers, each created once:
a :class:`GenerationWorker` per language model (continuous batching), a
:class:`MicroBatcher` for the RAG encoder's embeddings and one for the classifier. The
event loop only awaits them; model loading runs in a thread, so a first request that
loads a model does not stall the others.

Embeddings have two lanes (see :mod:`src.api.batching`): what someone is waiting on
(``/rag-search`` and ``/query``'s query, ``/query``'s evidence sentences) is ``interactive``,
where the shortest request goes first, so a one-line query waits for at most one bounded
sub-batch of other work; ``/v1/embeddings`` is ``bulk``, served by its own worker. Evidence
sentences' vectors are cached and computed once even when many queries want them at once.

Priorities (:mod:`src.api.priority`): the retrieval path (the embedding workers, search, the
language model ``/query`` answers with, the event loop) runs at normal priority; the
classifier, the reward model and the other language models run at ``background_nice``, so on
a saturated machine a search does not wait for their share of the CPU.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from starlette.concurrency import run_in_threadpool

from src.api.batching import LANES, MicroBatcher
from src.api.generation import GenerationParams, GenerationResult, GenerationWorker
from src.data.prompts import ANSWER_STOP, Passage, grounded_prompt, select_passages
from src.api.registry import LANGUAGE_MODELS, ModelRegistry
from src.core.errors import NotTrainedError
from src.rag.store import keyword_terms


class PromptTooLongError(ValueError):
    """A prompt longer than the server's token limit (HTTP 400)."""


@dataclass
class ServerSettings:
    """How the server runs; ``python -m src.api.main --help`` sets them."""

    checkpoints_dir: Path = Path("checkpoints")
    export_dir: Optional[Path] = None
    api_key: Optional[str] = None
    device: str = "auto"
    max_request_bytes: int = 1_000_000
    max_prompt_tokens: int = 4096
    max_batch_size: int = 32
    max_pending: int = 512
    preload: bool = True
    request_timeout_s: Optional[float] = 300.0  # None: no limit

    # Embedding workers, each with its own copy of the encoder (a fast tokenizer must not be
    # shared across threads; 0: one per core, at most 2), and the bound of one sub-batch in
    # padded tokens: an interactive request waits for at most one such sub-batch of bulk work.
    embedding_workers: int = 0
    embedding_batch_tokens: int = 1024

    # The language models' decoding step (src.mamba.generate.Decoder): auto = MARK's native
    # CPU kernel where the model allows it, else eager; compile = torch.compile at start-up.
    decoder: str = "auto"
    # The niceness of the workers off the retrieval path (src.api.priority): the classifier, the
    # reward model and the language models other than the one /query answers with. 0: every
    # worker at normal priority.
    background_nice: int = 10
    board: bool = False  # also serve the MARK Board (web UI) at /board

MAX_EVIDENCE_CANDIDATES = 64
# Sentences embedded per /query: of the candidates, those sharing the most words with the
# query (a first, lexical stage, as rerankers run after a cheap retriever). Embedding every
# candidate (22.5 on average on the sample questions, up to 64) made a fresh server's first
# /queries wait on each other. The top sentence stays the same for 96% of the sample questions.
EVIDENCE_EMBEDDED = 16
SENTENCE_CACHE_SIZE = 20_000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# A line that starts a block of its own: a Markdown heading, a list item or a table row.
_BLOCK_START = re.compile(r"(#{1,6}\s|[-*+]\s|\d{1,3}[.)]\s|\|)")
_HEADING = re.compile(r"#{1,6}\s")


@dataclass(frozen=True)
class Evidence:
    """A sentence of a retrieved chunk and its cosine similarity to the query."""

    doc_id: str
    sentence: str
    score: float


@dataclass
class Answer:
    """A grounded answer: the generation, the prompt it read, what was retrieved and used,
    and the retrieved sentences that best match the query (``evidence``)."""

    result: GenerationResult
    prompt: str
    hits: list
    used: list[Passage]
    model: str = "mamba"  # the language model that answered
    evidence: list[Evidence] = field(default_factory=list)
    mode: str | None = None  # the search mode used
    strategy: str | None = None  # mode auto: the retrieval policy's mode@k


def lexical_shortlist(query: str, candidates: list[tuple[str, str]], size: int) -> list[tuple[str, str]]:
    """The ``size`` ``(doc_id, sentence)`` candidates sharing the most distinct keyword terms
    with ``query`` (the keyword index's tokenisation, stopwords dropped), ties kept in their
    order (retrieval rank, then position); all of them, in order, when there are no more."""
    if len(candidates) <= size:
        return candidates
    words = set(keyword_terms(query))
    shared = [len(words.intersection(keyword_terms(sentence))) for _, sentence in candidates]
    keep = sorted(sorted(range(len(candidates)), key=lambda i: -shared[i])[:size])
    return [candidates[i] for i in keep]


def split_sentences(text: str, min_chars: int = 12) -> list[str]:
    """``text``'s sentences, without the very short ones. Lines are joined into blocks first: a
    blank line, a heading, a list item or a table row starts a new block, a plain line break
    (text wrapped at a fixed width) does not; then blocks are split after . ! ? Markdown heading
    lines are left out: they are no evidence, and each hit carries its ``heading_path``."""
    blocks: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if (not stripped or _BLOCK_START.match(stripped)) and current:
            blocks.append(" ".join(current))
            current = []
        if stripped and not _HEADING.match(stripped):
            current.append(stripped)
    if current:
        blocks.append(" ".join(current))
    sentences = (" ".join(part.split()) for block in blocks for part in _SENTENCE_END.split(block))
    return [s for s in sentences if len(s) >= min_chars]


def embedding_fn(encoder) -> Callable[[list[str]], list[tuple[np.ndarray, int]]]:
    """Texts -> ``(unit vector, tokens read)`` with ``encoder``, for one embedding worker thread."""

    def embed(texts: list[str]) -> list[tuple[np.ndarray, int]]:
        vectors = encoder.encode(texts, batch_size=64)
        # Counted here, on the worker thread: a fast tokenizer must not be shared across threads.
        lengths = [min(len(ids), encoder.max_seq_length) for ids in encoder.tokenizer(texts)["input_ids"]]
        return list(zip(vectors, lengths))

    return embed


def encoder_replica(encoder):
    """A copy of the RAG ``encoder`` with its own weights and tokenizer, for a second worker thread."""
    replica = copy.copy(encoder)
    replica.model = copy.deepcopy(encoder.model)
    replica.tokenizer = replica.model.tokenizer
    return replica


class ModelService:
    """The serving side of every model (see module docstring)."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings.checkpoints_dir, settings.export_dir, settings.device)
        self._workers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._sentence_vectors: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        # Sentences being embedded now -> (the task embedding them, their position in its batch):
        # concurrent /query requests over the same passages wait for one embedding, not one each.
        self._sentences_in_flight: dict[str, tuple[asyncio.Future, int]] = {}

    # ------------------------------------------------------------------ workers (created once)
    def _worker(self, key: str, build):
        worker = self._workers.get(key)
        if worker is None:
            with self._lock:
                worker = self._workers.get(key)
                if worker is None:
                    worker = self._workers[key] = build()
        return worker

    def workers(self) -> dict[str, Any]:
        """The workers started so far, by key (``generate:mamba``, ``embed``, ``classify``, ...)."""
        return dict(self._workers)

    def generator(self, name: str) -> GenerationWorker:
        """The generation worker of language model ``name`` (loads the model on first use)."""
        if name not in LANGUAGE_MODELS:
            raise KeyError(name)
        loaded = self.registry.get(name)
        s = self.settings
        return self._worker(
            f"generate:{name}",
            lambda: GenerationWorker(
                loaded.model, loaded.tokenizer, name, s.max_batch_size, s.max_pending,
                decoder=s.decoder, request_timeout_s=s.request_timeout_s,
                nice=0 if name == self.registry.answer_model() else s.background_nice,
            ),
        )

    def retriever(self):
        """The RAG index's :class:`~src.rag.retriever.Retriever`."""
        return self.registry.get("rag").model

    def embedder(self) -> MicroBatcher:
        """Texts -> ``(vector, tokens)`` with the RAG index's encoder (MiniLM)."""
        try:
            encoder = self.retriever().index.encoder
        except NotTrainedError as err:
            raise NotTrainedError(f"embeddings use the RAG index's encoder: {err}") from None

        s = self.settings
        max_len = encoder.max_seq_length

        def estimated_tokens(text: str) -> int:
            # A scheduling estimate (about 4 characters per word piece); the exact count
            # needs the tokenizer, which belongs to the worker threads.
            return min(max_len, 2 + len(text) // 4)

        def build() -> MicroBatcher:
            workers = s.embedding_workers or min(2, os.cpu_count() or 1)
            replicas = [encoder] + [encoder_replica(encoder) for _ in range(workers - 1)]
            # The last worker is kept for queries, the others take bulk work first. All run at
            # normal priority: when no bulk work waits, the bulk workers take queries' evidence
            # sentences too (measured on the demo models under 64 clients: /query p99 7.2 s with
            # the bulk worker at background_nice, 3.8 s without).
            return MicroBatcher(
                [embedding_fn(e) for e in replicas], "embedding", 64, s.max_pending,
                cost=estimated_tokens, max_cost=s.embedding_batch_tokens,
            )

        return self._worker("embed", build)

    def classifier(self) -> MicroBatcher:
        """Texts -> ``{"label", "probabilities"}`` with the fine-tuned classifier."""
        model = self.registry.get("transformer").model
        s = self.settings
        return self._worker("classify", lambda: MicroBatcher(model.predict, "classification", 64, s.max_pending, nice=s.background_nice))

    def reward_source(self) -> Path:
        """The reward model file: ``reward_model.pt`` next to the RLHF model (in the
        checkpoints folder or the export's ``rlhf/``)."""
        from src.core.load_model import is_export_dir

        source = self.registry.source("rlhf")
        if is_export_dir(source):
            source = source / "rlhf"
        return source / "reward_model.pt"

    def scorer(self) -> MicroBatcher:
        """``(prompt, response)`` pairs -> the reward model's normalized scores."""
        def build() -> MicroBatcher:
            from src.core.runtime import resolve_device
            from src.rlhf.load import load_reward_scorer

            scorer = load_reward_scorer(self.reward_source(), str(resolve_device(self.settings.device)))
            return MicroBatcher(
                lambda pairs: scorer.score([p for p, _ in pairs], [r for _, r in pairs]), "score", 64, self.settings.max_pending,
                nice=self.settings.background_nice,
            )

        return self._worker("score", build)

    async def ascorer(self) -> MicroBatcher:
        return await run_in_threadpool(self.scorer)

    async def agenerator(self, name: str) -> GenerationWorker:
        return await run_in_threadpool(self.generator, name)

    async def aembedder(self) -> MicroBatcher:
        return await run_in_threadpool(self.embedder)

    async def aclassifier(self) -> MicroBatcher:
        return await run_in_threadpool(self.classifier)

    # ------------------------------------------------------------------ requests
    def prompt_ids(self, worker: GenerationWorker, prompt: str) -> list[int]:
        """``prompt`` as the model reads it; longer than ``max_prompt_tokens`` is ``PromptTooLongError``."""
        ids = worker.encode_prompt(prompt)
        self.check_prompt_length(ids)
        return ids

    def grounded_prompt_ids(self, worker: GenerationWorker, prompt: str) -> list[int]:
        """A grounded prompt as ``worker``'s model reads it (:meth:`GenerationWorker.encode_grounded`:
        an RLHF model reads the last tokens it was trained on); too long is ``PromptTooLongError``."""
        ids = worker.encode_grounded(prompt)
        self.check_prompt_length(ids)
        return ids

    def check_prompt_length(self, ids: list[int]) -> None:
        """``PromptTooLongError`` when ``ids`` is longer than ``max_prompt_tokens``."""
        if len(ids) > self.settings.max_prompt_tokens:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens; this server reads at most {self.settings.max_prompt_tokens}"
            )

    def retrieval_policy(self):
        """The trained retrieval policy (``<checkpoints>/rl/final_model.pt``), loaded once; a
        ``NotTrainedError`` naming the command that trains it when there is none."""
        from src.rl.load import load_rl_policy

        def build():
            path = self.settings.checkpoints_dir / "rl" / "final_model.pt"
            if not path.is_file():
                raise NotTrainedError(
                    f"mode auto needs a trained retrieval policy, and {path} does not exist: train one with "
                    "`python -m src.scripts.train_rl --config configs/rl_train.yaml` (or use mode dense, bm25, hybrid, convex-<w>)")
            return load_rl_policy(path)

        return self._worker("retrieval-policy", build)

    async def search(self, query: str, top_k: int, mode: str | None = None) -> tuple[str, list, str | None]:
        """``(mode used, SearchResults, strategy)`` for ``query``; the query is embedded in the
        embedding workers' interactive lane. ``mode="auto"``: the retrieval policy picks the mode
        and how many documents (at most ``top_k``); ``strategy`` is its choice as ``mode@k`` (else ``None``)."""
        mode, hits, _, strategy = await self._search(query, top_k, mode)
        return mode, hits, strategy

    async def _search(self, query: str, top_k: int, mode: str | None) -> tuple[str, list, np.ndarray | None, str | None]:
        """:meth:`search`, with the query's vector (None in ``bm25`` mode) before the strategy."""
        retriever = await run_in_threadpool(self.retriever)
        policy = await run_in_threadpool(self.retrieval_policy) if mode == "auto" else None
        mode = mode or retriever.config.mode
        vector = None
        if mode != "bm25":
            vector = await self.embed_query(query)
        strategy = None
        if policy is not None:
            from src.rl.model import choose_retrieval_action

            choice = await run_in_threadpool(choose_retrieval_action, policy, retriever, query, vector)
            mode, top_k, strategy = choice.mode, min(top_k, choice.k), choice.label
        # In a worker thread: the event loop goes on serving while FAISS / BM25 search.
        hits = await run_in_threadpool(retriever.search, query, top_k, mode, vector)
        return mode, hits, vector, strategy

    async def embed_query(self, query: str) -> np.ndarray:
        """``query``'s vector, from the interactive lane."""
        embedder = await self.aembedder()
        return np.asarray((await embedder.arun([query], "interactive"))[0][0], dtype=np.float32)

    async def answer(
        self, query: str, top_k: int, model: str | None, params: GenerationParams, mode: str | None = None, evidence_k: int = 3
    ) -> Answer:
        """Retrieve, then generate an answer grounded in the retrieved passages; ``model`` None
        or ``"auto"``: the aligned model when trained, else the base model."""
        model = self.registry.answer_model(model)
        worker = await self.agenerator(model)  # fail fast (503) before searching when the LM is missing
        mode, hits, vector, strategy = await self._search(query, top_k, mode)
        used = select_passages([Passage(h.doc_id, h.text) for h in hits])
        prompt = grounded_prompt(query, used)
        params = replace(params, stop=tuple(params.stop) + ANSWER_STOP)
        result, evidence = await asyncio.gather(
            worker.agenerate(self.grounded_prompt_ids(worker, prompt), params),
            self.evidence(query, hits, evidence_k, vector),
        )
        return Answer(result=result, prompt=prompt, hits=hits, used=used, model=model, evidence=evidence, mode=mode, strategy=strategy)

    async def evidence(self, query: str, hits: list, k: int, query_vector: np.ndarray | None = None) -> list[Evidence]:
        """The ``k`` sentences of the retrieved chunks most similar to ``query`` under the RAG
        encoder (cosine of the normalized embeddings), best first: an extractive answer that
        does not depend on the language model. ``query_vector``: the query's embedding when
        the search already made it."""
        candidates: list[tuple[str, str]] = []
        seen: set[str] = set()
        for hit in hits:
            for sentence in split_sentences(hit.text):
                if sentence not in seen and len(candidates) < MAX_EVIDENCE_CANDIDATES:
                    seen.add(sentence)
                    candidates.append((hit.doc_id, sentence))
        if k <= 0 or not candidates:
            return []
        candidates = lexical_shortlist(query, candidates, EVIDENCE_EMBEDDED)
        embedder = await self.aembedder()
        if query_vector is None:
            query_vector = await self.embed_query(query)
        vectors = await self._sentence_vectors_of([sentence for _, sentence in candidates], embedder)
        scores = np.stack(vectors) @ np.asarray(query_vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Evidence(candidates[i][0], candidates[i][1], round(float(scores[i]), 6)) for i in order]

    async def _sentence_vectors_of(self, sentences: list[str], embedder: MicroBatcher) -> list[np.ndarray]:
        """The RAG encoder's vectors of ``sentences``. The index's chunks are fixed, so their
        sentences' vectors are kept (LRU) across queries, and a sentence another request is
        embedding right now is waited for, not embedded again (concurrent queries over the same
        passages would otherwise each embed all of them). They are someone's wait, so they go in
        the interactive lane, where shortest-first keeps one-line search queries ahead of them."""
        with self._lock:  # what is known now (a later eviction does not take it from this request)
            known = {s: self._sentence_vectors[s] for s in sentences if s in self._sentence_vectors}
            for sentence in known:
                self._sentence_vectors.move_to_end(sentence)
        missing = list(dict.fromkeys(s for s in sentences if s not in known and s not in self._sentences_in_flight))
        if missing:
            task = asyncio.ensure_future(embedder.arun(missing, "interactive"))
            for position, sentence in enumerate(missing):
                self._sentences_in_flight[sentence] = (task, position)

            def settled(done: asyncio.Future, sentences: list[str] = missing) -> None:
                failed = done.cancelled() or done.exception() is not None
                with self._lock:
                    for position, sentence in enumerate(sentences):
                        self._sentences_in_flight.pop(sentence, None)
                        if not failed:
                            self._sentence_vectors[sentence] = np.asarray(done.result()[position][0], dtype=np.float32)
                    while len(self._sentence_vectors) > SENTENCE_CACHE_SIZE:
                        self._sentence_vectors.popitem(last=False)

            task.add_done_callback(settled)
        waits = {s: self._sentences_in_flight[s] for s in sentences if s not in known}
        for task in {id(t): t for t, _ in waits.values()}.values():
            await asyncio.shield(task)  # one request's cancellation does not cancel the others' embedding
        for sentence, (task, position) in waits.items():
            known[sentence] = np.asarray(task.result()[position][0], dtype=np.float32)
        return [known[sentence] for sentence in sentences]

    def warm_up(self) -> float:
        """One small request through each started worker (every embedding replica, a search
        in each keyword/dense/hybrid mode, each language model, the classifier, the reward
        model when there is one): the one-time costs of first calls (lazy initialisation,
        first allocations, cold pages of the index) are paid here, not by the first users.
        Returns the seconds it took."""
        started = time.perf_counter()
        if self.registry.is_loaded("rlhf") and self.reward_source().is_file():
            self.scorer()
        for key, worker in self.workers().items():
            if isinstance(worker, GenerationWorker):
                worker.generate("Warm up", GenerationParams(max_new_tokens=2, temperature=0.0))
            elif key == "embed":  # bulk first: the bulk worker takes it, the kept worker the query
                rows = {lane: f.result() for lane, f in [(lane, worker.submit(["warm up"], lane)) for lane in reversed(LANES)]}
                retriever = self.retriever()
                vector = np.asarray(rows["interactive"][0][0], dtype=np.float32)
                for mode in ("bm25", "dense", "hybrid"):
                    retriever.search("warm up", 1, mode, vector)
            elif key == "classify":
                worker.run(["warm up"])
            elif key == "score":
                worker.run([("warm up", "warm up")])
        return time.perf_counter() - started

    def generation_stats(self) -> dict[str, dict[str, Any]]:
        stats = {}
        for key, worker in list(self._workers.items()):
            if isinstance(worker, GenerationWorker):
                stats[worker.name] = {
                    "steps": worker.steps,
                    "rows_decoded": worker.rows_decoded,
                    "max_batch_rows": worker.max_rows,
                    "mean_batch_rows": round(worker.rows_decoded / worker.steps, 2) if worker.steps else 0.0,
                    "active": worker.active,
                    "waiting": worker.pending,
                    "cancelled": worker.cancelled,
                }
        return stats

    def close(self) -> None:
        for worker in list(self._workers.values()):
            worker.close()
        self._workers.clear()
