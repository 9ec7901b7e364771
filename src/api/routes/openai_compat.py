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
from dataclasses import dataclass, replace
from datetime import datetime
from typing import AsyncIterator

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from src.api.errors import APIError, error_body
from src.api.generation import GenerationParams, GenerationResult, GenerationTimeoutError, GenerationWorker, TokenLogprobs
from src.data.prompts import CHAT_STOP, chat_prompt
from src.api.registry import LANGUAGE_MODELS
from src.api.routes.mark import ERRORS, SSE_OR_JSON, primed, service_of, sse
from src.api.schemas import (
    MAX_SEED,
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    OpenAIModel,
    OpenAIModelList,
    ScoreRequest,
    ScoreResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    embedding_model_ids,
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


def _params(
    max_tokens: int | None, temperature: float | None, top_p: float | None, stop, seed, index: int = 0,
    logprobs: int | None = None, echo: bool = False,
) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=16 if max_tokens is None else max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=tuple(stop or ()),
        # n choices with one seed still differ; wrapped so the seed stays in torch's 64-bit range
        seed=None if seed is None else (seed + index) % (MAX_SEED + 1),
        logprobs=logprobs,
        echo=echo,
    )


def _usage(prompt_tokens: int, results: list[GenerationResult]) -> Usage:
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _include_usage(stream_options) -> bool:
    return bool(stream_options is not None and stream_options.include_usage)


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


# ------------------------------------------------------------------------------ prompts
@dataclass
class PromptInput:
    """One prompt as the model reads it: ``ids`` (``<|bos|>`` first), the prompt's text, and
    from which position its own tokens start (1 when the server put ``<|bos|>`` in front)."""

    ids: list[int]
    text: str
    own_from: int


def _prompt_input(service, worker: GenerationWorker, prompt: str | list[int]) -> PromptInput:
    """A text prompt is read after ``<|bos|>``, as MARK's models were trained; so is a
    token-id prompt that does not already start with it."""
    tokenizer = worker.tokenizer
    if isinstance(prompt, str):
        return PromptInput(service.prompt_ids(worker, prompt), prompt, 1)
    bad = [t for t in prompt if t >= tokenizer.vocab_size]
    if bad:
        raise APIError(
            400, f"prompt: token id {bad[0]} is not in the vocabulary of {worker.name} (ids 0..{tokenizer.vocab_size - 1})",
            "invalid_request_error", "prompt",
        )
    own_from = 0 if prompt[0] == tokenizer.bos_id else 1
    ids = list(prompt) if own_from == 0 else [tokenizer.bos_id] + list(prompt)
    service.check_prompt_length(ids)
    return PromptInput(ids, tokenizer.decode(ids[own_from:], skip_special_tokens=False), own_from)


def _prompts(body: CompletionRequest) -> list:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _completion_logprobs(tokenizer, parts: list[TokenLogprobs], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's completions ``logprobs`` over ``parts`` (the echoed prompt, the generated text)."""
    tokens, values, tops, offsets = [], [], [], []
    for part in parts:
        for token_id, value, top in zip(part.ids, part.logprobs, part.top):
            text = _token_text(tokenizer, token_id)
            tokens.append(text)
            values.append(value)
            tops.append(None if value is None else {_token_text(tokenizer, t): lp for t, lp in top})
            offsets.append(offset)
            offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _own_prompt_logprobs(result: GenerationResult, prompt: PromptInput) -> TokenLogprobs:
    lp = result.prompt_logprobs
    return TokenLogprobs(lp.ids[prompt.own_from :], lp.logprobs[prompt.own_from :], lp.top[prompt.own_from :])


def _chat_logprobs(tokenizer, part: TokenLogprobs) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return ChatLogprobs(content=[
        TokenLogprob(**entry(t, v), top_logprobs=[TopLogprob(**entry(tt, tv)) for tt, tv in top])
        for t, v, top in zip(part.ids, part.logprobs, part.top)
    ])


async def _all_or_none(coroutines: list) -> list:
    """The results of all ``coroutines`` (run concurrently); when one fails, the others are
    cancelled (their generations stop) and the error is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# ------------------------------------------------------------------------------ streaming
async def _open_streams(worker: GenerationWorker, jobs: list[tuple[list[int], GenerationParams]]) -> list:
    """Start every job's stream; an error before any event (queue full, ...) closes the
    others and is raised, so it becomes an HTTP error status, not a broken stream."""
    opened = await asyncio.gather(*[primed(worker.astream(ids, params)) for ids, params in jobs], return_exceptions=True)
    errors = [o for o in opened if isinstance(o, BaseException)]
    if errors:
        for stream in opened:
            if not isinstance(stream, BaseException):
                await stream.aclose()
        raise errors[0]
    return opened


async def _merged(streams: list) -> AsyncIterator[tuple[int, str, object]]:
    """``(stream index, kind, payload)`` events of all ``streams`` as they come; a stream's
    error is an ``("error", exception)`` event. Closing it closes every stream."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for kind, payload in stream:
                await events.put((index, kind, payload))
        except Exception as err:  # noqa: BLE001 - handed to the consumer as an event
            await events.put((index, "error", err))
        finally:
            await events.put((index, "end", None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, kind, payload = await events.get()
            if kind == "end":
                running -= 1
                continue
            yield index, kind, payload
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


def _stream_error(err: Exception) -> dict:
    if isinstance(err, GenerationTimeoutError):
        return error_body(504, str(err), "timeout")
    return error_body(500, f"internal error: {type(err).__name__}", "internal_error")


def _event_stream(body) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


SSE_RESPONSE = SSE_OR_JSON


# ------------------------------------------------------------------------------ completions
@router.post("/completions", response_model=CompletionResponse, responses=SSE_RESPONSE)
async def completions(body: CompletionRequest, request: Request):
    """Text completion of ``prompt`` (a string, token ids, or a list of either) with ``mamba``
    or ``rlhf``; ``n`` choices per prompt. ``logprobs=N``: each token's logprob and the N most
    likely tokens; ``echo``: the prompt first (its first token's logprob is null when nothing
    precedes it: prompts are read after ``<|bos|>``, so only a prompt that starts with it)."""
    model = _language_model(body.model)
    service = service_of(request)
    worker = await service.agenerator(model)
    tokenizer = worker.tokenizer
    prompts = [_prompt_input(service, worker, p) for p in _prompts(body)]
    n = body.n or 1
    echo = bool(body.echo)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    jobs = [
        (prompt, _params(body.max_tokens, body.temperature, body.top_p, body.stop, body.seed, i, body.logprobs, echo))
        for prompt in prompts
        for i in range(n)
    ]
    prompt_tokens = sum(len(p.ids) for p in prompts)

    if body.stream:
        streams = await _open_streams(worker, [(p.ids, params) for p, params in jobs])

        def chunk(index: int, text: str, logprobs=None, finish_reason=None, usage=None) -> str:
            choices = [] if index < 0 else [CompletionChoice(text=text, index=index, logprobs=logprobs, finish_reason=finish_reason)]
            return sse(CompletionResponse(id=completion_id, created=created, model=model, choices=choices, usage=usage).model_dump())

        async def events():
            pending: dict[int, TokenLogprobs] = {}
            offsets = [0] * len(jobs)
            results = []
            async for index, kind, payload in _merged(streams):
                prompt, params = jobs[index]
                if kind == "prompt":  # echo: the prompt comes first
                    part = TokenLogprobs(payload.ids[prompt.own_from:], payload.logprobs[prompt.own_from:], payload.top[prompt.own_from:])
                    lp = _completion_logprobs(tokenizer, [part]) if params.logprobs is not None else None
                    offsets[index] = len(prompt.text)
                    yield chunk(index, prompt.text, lp)
                elif kind == "logprobs":
                    part = pending.setdefault(index, TokenLogprobs())
                    part.ids.append(payload[0]), part.logprobs.append(payload[1]), part.top.append(payload[2])
                elif kind == "text":
                    part = pending.pop(index, None)
                    lp = _completion_logprobs(tokenizer, [part], offsets[index]) if part is not None else None
                    offsets[index] += len(payload)
                    yield chunk(index, payload, lp)
                elif kind == "done":
                    part = pending.pop(index, None)
                    lp = _completion_logprobs(tokenizer, [part], offsets[index]) if part is not None else None
                    results.append(payload)
                    yield chunk(index, "", lp, payload.finish_reason)
                elif kind == "error":
                    yield sse(_stream_error(payload))
                    return
            if _include_usage(body.stream_options):
                yield chunk(-1, "", usage=_usage(prompt_tokens, results))
            yield sse("[DONE]")

        return _event_stream(events())

    results = await _all_or_none([worker.agenerate(prompt.ids, params) for prompt, params in jobs])
    choices = []
    for i, ((prompt, params), result) in enumerate(zip(jobs, results)):
        text = (prompt.text if echo else "") + result.text
        logprobs = None
        if params.logprobs is not None:
            parts = ([_own_prompt_logprobs(result, prompt)] if echo else []) + [result.logprobs]
            logprobs = _completion_logprobs(tokenizer, parts)
        choices.append(CompletionChoice(text=text, index=i, logprobs=logprobs, finish_reason=result.finish_reason))
    return CompletionResponse(id=completion_id, created=created, model=model, choices=choices, usage=_usage(prompt_tokens, results))


# ------------------------------------------------------------------------------ chat
@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=SSE_RESPONSE)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """The assistant's next message after ``messages`` (``stream: true`` for chunks), ``n``
    choices; ``logprobs`` / ``top_logprobs`` for each generated token's logprob."""
    model = _language_model(body.model)
    turns = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages if m.text().strip()]
    service = service_of(request)
    worker = await service.agenerator(model)
    tokenizer = worker.tokenizer
    ids = service.prompt_ids(worker, chat_prompt(turns))
    n = body.n or 1
    max_tokens = body.max_completion_tokens or body.max_tokens
    chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    want_logprobs = bool(body.logprobs) or body.top_logprobs is not None

    def params(index: int = 0) -> GenerationParams:
        p = _params(max_tokens, body.temperature, body.top_p, body.stop, body.seed, index, (body.top_logprobs or 0) if want_logprobs else None)
        return replace(p, stop=p.stop + CHAT_STOP)

    if body.stream:
        streams = await _open_streams(worker, [(ids, params(i)) for i in range(n)])

        def chunk(choices: list, usage: Usage | None = None) -> str:
            payload = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
            if usage is not None:
                payload["usage"] = usage.model_dump()
            return sse(payload)

        async def events():
            began = [False] * n
            pending: dict[int, TokenLogprobs] = {}
            results = []
            async for index, kind, payload in _merged(streams):
                if kind == "logprobs":
                    part = pending.setdefault(index, TokenLogprobs())
                    part.ids.append(payload[0]), part.logprobs.append(payload[1]), part.top.append(payload[2])
                elif kind == "text":
                    text = payload
                    if not began[index]:  # the answer starts after "Assistant:": drop the space before it
                        text = text.lstrip()
                        if not text:
                            continue
                    delta = {"content": text}
                    if not began[index]:
                        delta["role"] = "assistant"
                        began[index] = True
                    part = pending.pop(index, None)
                    lp = _chat_logprobs(tokenizer, part).model_dump() if part is not None else None
                    yield chunk([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                elif kind == "done":
                    part = pending.pop(index, None)
                    lp = _chat_logprobs(tokenizer, part).model_dump() if part is not None else None
                    results.append(payload)
                    yield chunk([{"index": index, "delta": {}, "logprobs": lp, "finish_reason": payload.finish_reason}])
                elif kind == "error":
                    yield sse(_stream_error(payload))
                    return
            if _include_usage(body.stream_options):
                yield chunk([], _usage(len(ids), results))
            yield sse("[DONE]")

        return _event_stream(events())

    results = await _all_or_none([worker.agenerate(ids, params(i)) for i in range(n)])
    choices = [
        ChatChoice(
            index=i, message=ChatChoiceMessage(content=r.text.strip()), finish_reason=r.finish_reason,
            logprobs=_chat_logprobs(tokenizer, r.logprobs) if want_logprobs else None,
        )
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
    if body.model not in embedding_model_ids(encoder.name):
        raise APIError(404, f"model '{body.model}' is not served here; embedding model: {EMBEDDING_MODEL_ID}", "invalid_request_error", "model")
    if body.dimensions is not None and body.dimensions != encoder.dim:
        raise APIError(400, f"dimensions: {EMBEDDING_MODEL_ID} embeddings have {encoder.dim} dimensions", "invalid_request_error", "dimensions")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    rows = await embedder.arun(texts, "bulk")  # batch work: search queries go first (src.api.batching)
    data = []
    for i, (vector, _) in enumerate(rows):
        vector = np.asarray(vector, dtype="<f4")
        value = base64.b64encode(vector.tobytes()).decode() if body.encoding_format == "base64" else vector.tolist()
        data.append(Embedding(index=i, embedding=value))
    tokens = sum(count for _, count in rows)
    return EmbeddingResponse(data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.post("/score", response_model=ScoreResponse, tags=["rlhf"])
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """The reward model's normalized score of each ``(prompt, response)`` pair (higher:
    preferred), as LLaMA-Factory's scoring API offers. The reward model is the RLHF run's
    ``reward_model.pt``."""
    start = time.perf_counter()
    scorer = await service_of(request).ascorer()
    scores = await scorer.arun([(pair.prompt, pair.response) for pair in body.input])
    return ScoreResponse(model=body.model, scores=[float(s) for s in scores], took_ms=round((time.perf_counter() - start) * 1000, 2))
