"""OpenAI-compatible endpoints, so standard clients (``openai.OpenAI(base_url=".../v1")``) work.

Model ids: ``mamba`` and ``rlhf`` for completions and chat, ``minilm`` (or the RAG index's
embedding model name) for embeddings. Chat messages are laid out by
:func:`src.data.prompts.chat_prompt`; streaming is server-sent events ending in ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import replace
from datetime import datetime

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from src.api.errors import APIError
from src.api.generation import GenerationParams, GenerationResult, GenerationWorker
from src.data.prompts import CHAT_STOP, chat_prompt
from src.api.registry import LANGUAGE_MODELS
from src.api.routes.mark import ERRORS, primed, service_of, sse
from src.api.schemas import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    OpenAIModel,
    OpenAIModelList,
    Usage,
)
from src.core.errors import NotTrainedError

EMBEDDING_MODEL_ID = "minilm"
router = APIRouter(prefix="/v1", tags=["openai"], responses={**ERRORS, 404: ERRORS[400]})


def _language_model(name: str) -> str:
    if name not in LANGUAGE_MODELS:
        raise APIError(
            404, f"model '{name}' is not served here; language models: {', '.join(LANGUAGE_MODELS)}",
            "invalid_request_error", "model",
        )
    return name


def _params(max_tokens: int | None, temperature: float | None, top_p: float | None, stop, seed, index: int = 0) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=max_tokens or 16,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=tuple(stop or ()),
        seed=None if seed is None else seed + index,  # n choices with one seed still differ
    )


def _usage(prompt_tokens: int, results: list[GenerationResult]) -> Usage:
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _include_usage(stream_options: dict | None) -> bool:
    return bool((stream_options or {}).get("include_usage"))


@router.get("/models", response_model=OpenAIModelList)
async def list_models(request: Request) -> OpenAIModelList:
    """The trained language models and the embedding model."""
    registry = service_of(request).registry
    data = []
    for name in LANGUAGE_MODELS + ("rag",):
        status = registry.status(name)
        if status["status"] == "not_trained":
            continue
        created = int(datetime.fromisoformat(status["trained_at"]).timestamp()) if status.get("trained_at") else 0
        data.append(OpenAIModel(id=EMBEDDING_MODEL_ID if name == "rag" else name, created=created))
    return OpenAIModelList(data=data)


async def _stream_choice(
    worker: GenerationWorker, ids: list[int], params: GenerationParams, make_chunk, include_usage: bool, usage_chunk
) -> StreamingResponse:
    events = await primed(worker.astream(ids, params))

    async def body():
        try:
            async for kind, payload in events:
                if kind == "text":
                    chunk = make_chunk(payload, None)
                    if chunk is not None:
                        yield sse(chunk)
                else:
                    yield sse(make_chunk(None, payload.finish_reason))
                    if include_usage:
                        yield sse(usage_chunk(_usage(len(ids), [payload])))
            yield sse("[DONE]")
        finally:
            await events.aclose()  # the client left early: stop generating for it

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request):
    """Text completion of ``prompt`` (a string or a list of strings) with ``mamba`` or ``rlhf``."""
    model = _language_model(body.model)
    if body.echo or body.logprobs:
        raise APIError(400, "echo and logprobs are not supported", "invalid_request_error", "echo" if body.echo else "logprobs")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    n = body.n or 1
    service = service_of(request)
    worker = await service.agenerator(model)
    prompt_ids = [service.prompt_ids(worker, p) for p in prompts]
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        if n > 1 or len(prompts) > 1:
            raise APIError(400, "streaming returns one completion: use n=1 and a single prompt", "invalid_request_error", "stream")

        def chunk(text, finish_reason):
            choice = CompletionChoice(text=text or "", index=0, finish_reason=finish_reason)
            return CompletionResponse(id=completion_id, created=created, model=model, choices=[choice]).model_dump()

        def usage_chunk(usage):
            return CompletionResponse(id=completion_id, created=created, model=model, choices=[], usage=usage).model_dump()

        params = _params(body.max_tokens, body.temperature, body.top_p, body.stop, body.seed)
        return await _stream_choice(worker, prompt_ids[0], params, chunk, _include_usage(body.stream_options), usage_chunk)

    jobs = [
        worker.agenerate(ids, _params(body.max_tokens, body.temperature, body.top_p, body.stop, body.seed, i))
        for ids in prompt_ids
        for i in range(n)
    ]
    results = await asyncio.gather(*jobs)
    choices = [CompletionChoice(text=r.text, index=i, finish_reason=r.finish_reason) for i, r in enumerate(results)]
    return CompletionResponse(
        id=completion_id, created=created, model=model, choices=choices,
        usage=_usage(sum(len(ids) for ids in prompt_ids), results),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """The assistant's next message after ``messages`` (``stream: true`` for chunks)."""
    model = _language_model(body.model)
    turns = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages if m.text().strip()]
    service = service_of(request)
    worker = await service.agenerator(model)
    ids = service.prompt_ids(worker, chat_prompt(turns))
    n = body.n or 1
    max_tokens = body.max_completion_tokens or body.max_tokens
    chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def params(index: int = 0) -> GenerationParams:
        p = _params(max_tokens, body.temperature, body.top_p, body.stop, body.seed, index)
        return replace(p, stop=p.stop + CHAT_STOP)

    if body.stream:
        if n > 1:
            raise APIError(400, "streaming returns one choice: use n=1", "invalid_request_error", "n")
        began = False

        def chunk(text, finish_reason):
            nonlocal began
            if finish_reason is not None:
                delta = {}
            else:
                if not began:  # the answer starts after "Assistant:": drop the space before it
                    text = text.lstrip()
                    if not text:
                        return None
                delta = {"content": text}
                if not began:
                    delta["role"] = "assistant"
                    began = True
            return {
                "id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        def usage_chunk(usage):
            return {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage.model_dump()}

        return await _stream_choice(worker, ids, params(), chunk, _include_usage(body.stream_options), usage_chunk)

    results = await asyncio.gather(*[worker.agenerate(ids, params(i)) for i in range(n)])
    choices = [
        ChatChoice(index=i, message=ChatChoiceMessage(content=r.text.strip()), finish_reason=r.finish_reason)
        for i, r in enumerate(results)
    ]
    return ChatCompletionResponse(id=chat_id, created=created, model=model, choices=choices, usage=_usage(len(ids), results))


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    """MiniLM sentence embeddings (the RAG index's encoder), L2-normalised."""
    service = service_of(request)
    try:
        embedder = await service.aembedder()
    except NotTrainedError:
        if body.model != EMBEDDING_MODEL_ID:
            raise APIError(404, f"model '{body.model}' is not served here; embedding model: {EMBEDDING_MODEL_ID}", "invalid_request_error", "model") from None
        raise
    encoder = service.retriever().index.encoder
    if body.model not in (EMBEDDING_MODEL_ID, encoder.name, encoder.name.rsplit("/", 1)[-1]):
        raise APIError(404, f"model '{body.model}' is not served here; embedding model: {EMBEDDING_MODEL_ID}", "invalid_request_error", "model")
    if body.dimensions is not None and body.dimensions != encoder.dim:
        raise APIError(400, f"dimensions: {EMBEDDING_MODEL_ID} embeddings have {encoder.dim} dimensions", "invalid_request_error", "dimensions")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    rows = await embedder.arun(texts)
    data = []
    for i, (vector, _) in enumerate(rows):
        vector = np.asarray(vector, dtype="<f4")
        value = base64.b64encode(vector.tobytes()).decode() if body.encoding_format == "base64" else vector.tolist()
        data.append(Embedding(index=i, embedding=value))
    tokens = sum(count for _, count in rows)
    return EmbeddingResponse(data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
