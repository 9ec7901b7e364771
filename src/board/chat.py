"""Grounded chat for the Board, on the API server's model service.

An answer is composed exactly as the API's ``/query`` composes it (``ModelService``:
``search`` -> ``select_passages`` -> ``grounded_prompt`` -> the language model's generation
worker, ``evidence`` for the best-matching retrieved sentences) but streamed token by token,
with the conversation's earlier turns in the prompt. With RAG off the prompt is the same
layout without context. Models: ``mamba`` (base), ``rlhf`` (the served aligned model) and
every other folder of the checkpoints folder holding an ``rlhf_final_model.pt`` (e.g. a
model aligned on Board ratings), named ``aligned:<folder>``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from src.api.generation import GenerationParams
from src.api.service import ModelService, ServerSettings
from src.core.errors import MarkError
from src.data.prompts import ANSWER_STOP, Passage, cut_at_stop, grounded_prompt, select_passages
from src.rlhf.load import FINAL_MODEL

ALIGNED_PREFIX = "aligned:"


@dataclass
class ChatUpdate:
    """One step of a streamed answer: the text so far, and what it was grounded in."""

    text: str
    prompt: str
    model: str
    evidence: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None


class ChatModels:
    """The language models the Chat tab can pick, each served by a generation worker.

    ``service`` is the server's :class:`ModelService` (retrieval, ``mamba``, ``rlhf``);
    an ``aligned:<folder>`` model gets its own service reading that folder."""

    def __init__(self, service: ModelService) -> None:
        self.service = service
        self._aligned: dict[str, ModelService] = {}
        self._lock = threading.Lock()

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.service.registry.checkpoints_dir)

    def choices(self) -> list[str]:
        """``mamba``, ``rlhf`` and one ``aligned:<folder>`` per other aligned model found."""
        aligned = sorted(
            f"{ALIGNED_PREFIX}{p.parent.name}" for p in self.checkpoints_dir.glob(f"*/{FINAL_MODEL}") if p.parent.name != "rlhf"
        ) if self.checkpoints_dir.is_dir() else []
        return ["mamba", "rlhf", *aligned]

    def worker(self, model: str):
        """The generation worker of ``model`` (loaded on first use; ``NotTrainedError`` names the command)."""
        if not model.startswith(ALIGNED_PREFIX):
            return self.service.generator(model)
        folder = self.checkpoints_dir / model[len(ALIGNED_PREFIX):]
        if folder.parent != self.checkpoints_dir or not (folder / FINAL_MODEL).is_file():
            raise MarkError(f"{model}: no {FINAL_MODEL} in {folder}")
        with self._lock:
            service = self._aligned.get(model)
            if service is None:
                settings = replace(self.service.settings, export_dir=folder, preload=False)
                service = self._aligned[model] = ModelService(settings)
        return service.generator("rlhf")

    def close(self) -> None:
        for service in self._aligned.values():
            service.close()
        self._aligned.clear()


async def prepare(models: ChatModels, question: str, history: Sequence[tuple[str, str]], rag: bool, top_k: int,
                  mode: str | None, evidence_k: int = 3) -> tuple[str, list, list]:
    """``(prompt, evidence, hits)`` of the next answer: retrieval and evidence as ``/query``
    does them when ``rag``, else the prompt without context."""
    if not question.strip():
        raise MarkError("ask a question first")
    service = models.service
    hits: list = []
    evidence: list = []
    if rag:
        _, hits, _ = await service.search(question, top_k, mode)
        evidence = await service.evidence(question, hits, evidence_k)
    used = select_passages([Passage(h.doc_id, h.text) for h in hits])
    return grounded_prompt(question, used, history), evidence, hits


def _sources(hits: list) -> list[dict[str, Any]]:
    return [{"doc_id": h.doc_id, "source": (h.metadata or {}).get("source", ""), "score": round(float(h.score), 4)} for h in hits]


async def stream_answer(
    models: ChatModels, question: str, history: Sequence[tuple[str, str]] = (), model: str = "rlhf", rag: bool = True,
    top_k: int = 3, mode: str | None = None, params: GenerationParams = GenerationParams(max_new_tokens=64, temperature=0.7),
    evidence_k: int = 3,
) -> AsyncIterator[ChatUpdate]:
    """Stream the answer to ``question`` after the ``history`` turns (``(role, text)``):
    a first update with the evidence and sources and no text, then one per generated
    piece, the last with ``done`` and the finish reason."""
    worker = await asyncio.to_thread(models.worker, model)  # fail before retrieval when the model is missing
    prompt, evidence, hits = await prepare(models, question, history, rag, top_k, mode, evidence_k)
    evidence_rows = [{"doc_id": e.doc_id, "sentence": e.sentence, "score": e.score} for e in evidence]
    update = ChatUpdate("", prompt, model, evidence_rows, _sources(hits))
    yield update
    ids = models.service.prompt_ids(worker, prompt)
    params = replace(params, stop=tuple(params.stop) + ANSWER_STOP)
    text = ""
    async for kind, payload in worker.astream(ids, params):
        if kind == "text":
            text += payload
            yield replace(update, text=text)
        elif kind == "done":
            yield replace(update, text=cut_at_stop(payload.text), done=True, finish_reason=payload.finish_reason)


async def answer(models: ChatModels, question: str, **kwargs) -> ChatUpdate:
    """The whole answer of :func:`stream_answer` (its last update)."""
    last = None
    async for last in stream_answer(models, question, **kwargs):
        pass
    return last


async def sample_pair(
    models: ChatModels, question: str, history: Sequence[tuple[str, str]] = (), model: str = "rlhf", rag: bool = True,
    top_k: int = 3, mode: str | None = None, params: GenerationParams = GenerationParams(max_new_tokens=64, temperature=1.0),
    seed: int = 0,
) -> tuple[str, str, str]:
    """``(prompt, answer A, answer B)``: two answers sampled for the same prompt (seeds
    ``seed`` and ``seed + 1``), to be compared side by side."""
    if params.temperature <= 0:
        raise MarkError("two answers to compare need sampling: set a temperature above 0")
    worker = await asyncio.to_thread(models.worker, model)
    prompt, _, _ = await prepare(models, question, history, rag, top_k, mode, evidence_k=0)
    ids = models.service.prompt_ids(worker, prompt)
    stop = tuple(params.stop) + ANSWER_STOP
    first, second = await asyncio.gather(
        worker.agenerate(ids, replace(params, stop=stop, seed=seed)),
        worker.agenerate(ids, replace(params, stop=stop, seed=seed + 1)),
    )
    return prompt, cut_at_stop(first.text), cut_at_stop(second.text)


def new_service(checkpoints_dir: str | Path, device: str = "auto", decoder: str = "auto") -> ModelService:
    """A model service over ``checkpoints_dir`` for a Board running on its own (models load on first use)."""
    return ModelService(ServerSettings(checkpoints_dir=Path(checkpoints_dir), device=device, preload=False, decoder=decoder))
