"""What the HTTP routes call: the loaded models behind their batching workers.

:class:`ModelService` turns the registry's models into serving workers, each created once:
a :class:`GenerationWorker` per language model (continuous batching), a
:class:`MicroBatcher` for the RAG encoder's embeddings and one for the classifier. The
event loop only awaits them; model loading runs in a thread, so a first request that
loads a model does not stall the others.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
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


@dataclass
class Answer:
    """A grounded answer: the generation, the prompt it read, what was retrieved and used."""

    result: GenerationResult
    prompt: str
    hits: list
    used: list[Passage]
    model: str = "mamba"  # the language model that answered


class ModelService:
    """The serving side of every model (see module docstring)."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(settings.checkpoints_dir, settings.export_dir, settings.device)
        self._workers: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ workers (created once)
    def _worker(self, key: str, build):
        worker = self._workers.get(key)
        if worker is None:
            with self._lock:
                worker = self._workers.get(key)
                if worker is None:
                    worker = self._workers[key] = build()
        return worker

    def generator(self, name: str) -> GenerationWorker:
        """The generation worker of language model ``name`` (loads the model on first use)."""
        if name not in LANGUAGE_MODELS:
            raise KeyError(name)
        loaded = self.registry.get(name)
        s = self.settings
        return self._worker(
            f"generate:{name}",
            lambda: GenerationWorker(loaded.model, loaded.tokenizer, name, s.max_batch_size, s.max_pending),
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
        if len(ids) > self.settings.max_prompt_tokens:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens; this server reads at most {self.settings.max_prompt_tokens}"
            )
        return ids

    async def search(self, query: str, top_k: int, mode: str | None = None) -> tuple[str, list]:
        """``(mode used, SearchResults)`` for ``query``; the query is embedded by the shared encoder worker."""
        retriever = await run_in_threadpool(self.retriever)
        mode = mode or retriever.config.mode
        vector = None
        if mode != "bm25":
            embedder = await self.aembedder()
            vector = (await embedder.arun([query]))[0][0]
        hits = await run_in_threadpool(retriever.search, query, top_k, mode, vector)
        return mode, hits

    async def answer(self, query: str, top_k: int, model: str | None, params: GenerationParams, mode: str | None = None) -> Answer:
        """Retrieve, then generate an answer grounded in the retrieved passages; ``model`` None
        or ``"auto"``: the aligned model when trained, else the base model."""
        model = self.registry.answer_model(model)
        worker = await self.agenerator(model)  # fail fast (503) before searching when the LM is missing
        _, hits = await self.search(query, top_k, mode)
        used = select_passages([Passage(h.doc_id, h.text) for h in hits])
        prompt = grounded_prompt(query, used)
        params = replace(params, stop=tuple(params.stop) + ANSWER_STOP)
        result = await worker.agenerate(self.prompt_ids(worker, prompt), params)
        return Answer(result=result, prompt=prompt, hits=hits, used=used, model=model)

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
