"""What the HTTP routes call: the loaded models behind their batching workers.

:class:`ModelService` turns the registry's models into serving workers, each created once:
a :class:`GenerationWorker` per language model (continuous batching), a
:class:`MicroBatcher` for the RAG encoder's embeddings and one for the classifier. The
event loop only awaits them; model loading runs in a thread, so a first request that
loads a model does not stall the others.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
from starlette.concurrency import run_in_threadpool

from src.api.batching import MicroBatcher
from src.api.generation import GenerationParams, GenerationResult, GenerationWorker
from src.data.prompts import ANSWER_STOP, Passage, grounded_prompt, select_passages
from src.api.registry import LANGUAGE_MODELS, ModelRegistry
from src.core.errors import NotTrainedError


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

    # The language models' decoding step (src.mamba.generate.Decoder): auto = MARK's native
    # CPU kernel where the model allows it, else eager; compile = torch.compile at start-up.
    decoder: str = "auto"

MAX_EVIDENCE_CANDIDATES = 64
SENTENCE_CACHE_SIZE = 20_000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


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


def split_sentences(text: str, min_chars: int = 12) -> list[str]:
    """``text``'s sentences (split after . ! ? and at line breaks), without the very short ones."""
    sentences = (" ".join(part.split()) for part in _SENTENCE_END.split(text))
    return [s for s in sentences if len(s) >= min_chars]


class ModelService:
    """The serving side of every model (see module docstring)."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings.checkpoints_dir, settings.export_dir, settings.device)
        self._workers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._sentence_vectors: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

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

        def embed(texts: list[str]) -> list[tuple[np.ndarray, int]]:
            vectors = encoder.encode(texts, batch_size=64)
            # Counted here, on the worker thread: a fast tokenizer must not be shared across threads.
            lengths = [min(len(ids), encoder.max_seq_length) for ids in encoder.tokenizer(texts)["input_ids"]]
            return list(zip(vectors, lengths))

        return self._worker("embed", lambda: MicroBatcher(embed, "embedding", 64, self.settings.max_pending))

    def classifier(self) -> MicroBatcher:
        """Texts -> ``{"label", "probabilities"}`` with the fine-tuned classifier."""
        model = self.registry.get("transformer").model
        return self._worker("classify", lambda: MicroBatcher(model.predict, "classification", 64, self.settings.max_pending))

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
        """``(mode used, SearchResults, strategy)`` for ``query``; the query is embedded by the
        shared encoder worker. ``mode="auto"``: the retrieval policy picks the mode and how many
        documents (at most ``top_k``); ``strategy`` is its choice as ``mode@k`` (else ``None``)."""
        retriever = await run_in_threadpool(self.retriever)
        policy = await run_in_threadpool(self.retrieval_policy) if mode == "auto" else None
        mode = mode or retriever.config.mode
        vector = None
        if mode != "bm25":
            embedder = await self.aembedder()
            vector = (await embedder.arun([query]))[0][0]
        strategy = None
        if policy is not None:
            from src.rl.model import choose_retrieval_action

            choice = await run_in_threadpool(choose_retrieval_action, policy, retriever, query, vector)
            mode, top_k, strategy = choice.mode, min(top_k, choice.k), choice.label
        hits = await run_in_threadpool(retriever.search, query, top_k, mode, vector)
        return mode, hits, strategy

    async def answer(
        self, query: str, top_k: int, model: str | None, params: GenerationParams, mode: str | None = None, evidence_k: int = 3
    ) -> Answer:
        """Retrieve, then generate an answer grounded in the retrieved passages; ``model`` None
        or ``"auto"``: the aligned model when trained, else the base model."""
        model = self.registry.answer_model(model)
        worker = await self.agenerator(model)  # fail fast (503) before searching when the LM is missing
        mode, hits, strategy = await self.search(query, top_k, mode)
        used = select_passages([Passage(h.doc_id, h.text) for h in hits])
        prompt = grounded_prompt(query, used)
        params = replace(params, stop=tuple(params.stop) + ANSWER_STOP)
        result, evidence = await asyncio.gather(
            worker.agenerate(self.prompt_ids(worker, prompt), params),
            self.evidence(query, hits, evidence_k),
        )
        return Answer(result=result, prompt=prompt, hits=hits, used=used, model=model, evidence=evidence, mode=mode, strategy=strategy)

    async def evidence(self, query: str, hits: list, k: int) -> list[Evidence]:
        """The ``k`` sentences of the retrieved chunks most similar to ``query`` under the RAG
        encoder (cosine of the normalized embeddings), best first: an extractive answer that
        does not depend on the language model."""
        candidates: list[tuple[str, str]] = []
        seen: set[str] = set()
        for hit in hits:
            for sentence in split_sentences(hit.text):
                if sentence not in seen and len(candidates) < MAX_EVIDENCE_CANDIDATES:
                    seen.add(sentence)
                    candidates.append((hit.doc_id, sentence))
        if k <= 0 or not candidates:
            return []
        embedder = await self.aembedder()
        # The index's chunks are fixed, so their sentences' vectors are kept (LRU) across queries.
        missing = [sentence for _, sentence in candidates if sentence not in self._sentence_vectors]
        rows = await embedder.arun([query] + missing)
        with self._lock:
            for sentence, (vector, _) in zip(missing, rows[1:]):
                self._sentence_vectors[sentence] = np.asarray(vector, dtype=np.float32)
            vectors = []
            for _, sentence in candidates:
                self._sentence_vectors.move_to_end(sentence)
                vectors.append(self._sentence_vectors[sentence])
            while len(self._sentence_vectors) > SENTENCE_CACHE_SIZE:
                self._sentence_vectors.popitem(last=False)
        scores = np.stack(vectors) @ np.asarray(rows[0][0], dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [Evidence(candidates[i][0], candidates[i][1], round(float(scores[i]), 6)) for i in order]

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
