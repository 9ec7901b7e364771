"""MARK's own endpoints: health, models, retrieval, generation, classification, grounded answers."""

from __future__ import annotations

import json
import time
from typing import AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from src.api.errors import APIError
from src.api.generation import GenerationParams, GenerationWorker
from src.api.registry import SERVED_MODELS
from src.api.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    EvidenceSentence,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
    Prediction,
    QueryRequest,
    QueryResponse,
    RagSearchRequest,
    LanguageModelName,
    RagSearchResponse,
    SearchHit,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from src.mamba.tokenizer import BOS, EOS, PAD, UNK
from src.api.service import ModelService

ERRORS = {
    400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
    422: {"model": ErrorResponse}, 503: {"model": ErrorResponse},
}
router = APIRouter(responses=ERRORS)
GENERATION_ERRORS = {
    500: {"model": ErrorResponse, "description": "a generation failed inside the server (its prompt could not be read)"},
    504: {"model": ErrorResponse, "description": "the request ran past the server's request timeout"},
}
# One server-sent event: its ``data`` is a JSON object, or ``[DONE]`` last.
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
SSE_OR_JSON = {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
          "description": "JSON, or with stream: true server-sent events ending in [DONE]"},
    **GENERATION_ERRORS,
}


def service_of(request: Request) -> ModelService:
    return request.app.state.service


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def search_hit(result) -> SearchHit:
    """A retriever ``SearchResult`` as the API's ``SearchHit``."""
    return SearchHit(
        doc_id=result.doc_id, score=result.score, rank=result.rank, text=result.text,
        metadata=result.metadata, dense_score=result.dense_score, bm25_score=result.bm25_score,
        heading_path=result.heading_path, source=result.source,
    )


def sse(payload) -> str:
    """One server-sent event carrying JSON (or the literal ``[DONE]``)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def primed(events: AsyncGenerator) -> AsyncGenerator:
    """Start ``events`` now, so that errors before the first event (queue full, ...) become
    an HTTP error status instead of a broken stream; returns a generator over all events.
    Closing it (the client went away) closes ``events``, which cancels the generation."""
    first = await events.__anext__()

    async def chain():
        try:
            yield first
            async for event in events:
                yield event
        finally:
            await events.aclose()

    return chain()


@router.get("/health", response_model=HealthResponse, tags=["status"])
async def health(request: Request) -> HealthResponse:
    """Liveness, and which models are loaded / available / not trained (no key needed)."""
    registry = service_of(request).registry
    return HealthResponse(
        uptime_s=round(time.time() - request.app.state.started, 1),
        ready=request.app.state.ready,
        models={name: registry.status(name)["status"] for name in SERVED_MODELS},
    )


@router.get("/models", response_model=ModelsResponse, tags=["status"])
async def models(request: Request) -> ModelsResponse:
    """Each model: loaded or not, from which file, trained when, and why not when it is missing."""
    service = service_of(request)
    return ModelsResponse(
        models=[ModelInfo(**service.registry.status(name)) for name in SERVED_MODELS],
        generation=service.generation_stats(),
    )


@router.post("/rag-search", response_model=RagSearchResponse, tags=["retrieval"])
async def rag_search(body: RagSearchRequest, request: Request) -> RagSearchResponse:
    """The ``top_k`` documents of the RAG index best matching ``query``."""
    start = time.perf_counter()
    mode, hits, strategy = await service_of(request).search(body.query, body.top_k, body.mode)
    return RagSearchResponse(query=body.query, mode=mode, strategy=strategy, results=[search_hit(h) for h in hits], took_ms=_ms(start))


async def _generation_stream(worker: GenerationWorker, ids: list[int], params: GenerationParams, model: str, start: float):
    events = await primed(worker.astream(ids, params))

    async def body():
        try:
            async for kind, payload in events:
                if kind == "text":
                    yield sse({"text": payload})
                else:
                    yield sse({
                        "done": True, "model": model, "text": payload.text, "finish_reason": payload.finish_reason,
                        "prompt_tokens": payload.prompt_tokens, "completion_tokens": payload.completion_tokens,
                        "took_ms": _ms(start),
                    })
            yield sse("[DONE]")
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/generate", response_model=GenerateResponse, tags=["generation"], responses=SSE_OR_JSON)
async def generate(body: GenerateRequest, request: Request):
    """Continue ``prompt`` with the Mamba or the RLHF model (``stream: true`` for server-sent events)."""
    start = time.perf_counter()
    service = service_of(request)
    worker = await service.agenerator(body.model)
    ids = service.prompt_ids(worker, body.prompt)
    params = GenerationParams(body.max_new_tokens, body.temperature, body.top_p, tuple(body.stop or ()), body.seed)
    if body.stream:
        return await _generation_stream(worker, ids, params, body.model, start)
    result = await worker.agenerate(ids, params)
    return GenerateResponse(
        model=body.model, text=result.text, finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, took_ms=_ms(start),
    )


@router.post("/classify", response_model=ClassifyResponse, tags=["classification"])
async def classify(body: ClassifyRequest, request: Request) -> ClassifyResponse:
    """Label one ``text`` or a list of ``texts`` with the fine-tuned classifier."""
    start = time.perf_counter()
    classifier = await service_of(request).aclassifier()
    predictions = await classifier.arun(body.all_texts())
    return ClassifyResponse(predictions=[Prediction(**p) for p in predictions], took_ms=_ms(start))


@router.post("/query", response_model=QueryResponse, tags=["retrieval", "generation"], responses=GENERATION_ERRORS)
async def query(body: QueryRequest, request: Request) -> QueryResponse:
    """Retrieve ``top_k`` documents, then answer ``query`` from their text; ``doc_ids`` are the
    documents whose text the model read. ``answer_empty`` / ``answer_cut_off`` say when the
    generated answer is empty or stopped at ``max_new_tokens``; ``evidence`` always holds the
    retrieved sentences that best match the query (scored by the RAG encoder)."""
    start = time.perf_counter()
    params = GenerationParams(body.max_new_tokens, body.temperature, body.top_p, (), body.seed)
    answer = await service_of(request).answer(body.query, body.top_k, body.model, params, body.mode, body.evidence_k)
    text = answer.result.text.strip()
    return QueryResponse(
        query=body.query,
        answer=text,
        answer_empty=not text,
        answer_cut_off=answer.result.finish_reason == "length",
        evidence=[EvidenceSentence(doc_id=e.doc_id, sentence=e.sentence, score=e.score) for e in answer.evidence],
        doc_ids=[p.doc_id for p in answer.used],
        sources=[search_hit(h) for h in answer.hits],
        model=answer.model,
        mode=answer.mode,
        strategy=answer.strategy,
        finish_reason=answer.result.finish_reason,
        took_ms=_ms(start),
    )


# ------------------------------------------------------------------------------ tokenizer (vLLM-style)
@router.post("/tokenize", response_model=TokenizeResponse, tags=["tokenizer"])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """The token ids of ``prompt`` for ``model`` (``<|bos|>`` first unless ``add_special_tokens`` is false)."""
    service = service_of(request)
    worker = await service.agenerator(body.model)
    tokenizer = worker.tokenizer
    ids = ([tokenizer.bos_id] if body.add_special_tokens else []) + tokenizer.encode(body.prompt)
    return TokenizeResponse(
        tokens=ids, token_strs=[tokenizer.decode([i], skip_special_tokens=False) for i in ids],
        count=len(ids), max_model_len=service.settings.max_prompt_tokens,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenizer"])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids ``tokens`` (special tokens written out, so that the text encodes back to them)."""
    worker = await service_of(request).agenerator(body.model)
    tokenizer = worker.tokenizer
    bad = [t for t in body.tokens if t >= tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"tokens: id {bad[0]} is not in the vocabulary (ids 0..{tokenizer.vocab_size - 1})", "invalid_request_error", "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))


@router.get("/tokenizer_info", response_model=TokenizerInfo, tags=["tokenizer"])
async def tokenizer_info(request: Request, model: LanguageModelName = "mamba") -> TokenizerInfo:
    """The language model's tokenizer: special tokens and sizes (what lm-evaluation-harness's
    remote tokenizer reads)."""
    service = service_of(request)
    worker = await service.agenerator(model)
    tokenizer = worker.tokenizer
    return TokenizerInfo(
        model=model, tokenizer_class=type(tokenizer).__name__, vocab_size=tokenizer.vocab_size,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=service.settings.max_prompt_tokens,
    )


# ------------------------------------------------------------------------------ metrics
@router.get(
    "/metrics", tags=["status"], response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: requests by route and status, latency histograms, prompt and
    generated tokens, tokens/s, queue depth and running batch size."""
    exposition = request.app.state.metrics
    return Response(exposition.render(), media_type=exposition.content_type)
