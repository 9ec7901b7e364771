"""Request and response models of the API server: these classes are the HTTP contract.

MARK's own endpoints (``/rag-search``, ``/generate``, ``/classify``, ``/query``) take
strict JSON: unknown fields, wrong types (``"5"`` for an integer) and blank strings are
refused with 422. The OpenAI-compatible endpoints (``/v1/...``) follow OpenAI's request
shapes and ignore fields MARK does not use, so standard clients work unchanged.
Every error, whatever the endpoint, is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Limits (requests beyond them get a 4xx, never a slow or failed generation).
MAX_QUERY_CHARS = 2_000
MAX_PROMPT_CHARS = 16_000
MAX_TEXT_CHARS = 20_000
MAX_TEXTS = 64
MAX_TOP_K = 50
MAX_QUERY_TOP_K = 20
MAX_NEW_TOKENS = 512
MAX_STOP_STRINGS = 4
MAX_CHOICES = 4
MAX_MESSAGES = 64

LanguageModelName = Literal["mamba", "rlhf"]
SearchModeName = Literal["dense", "bm25", "hybrid"]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


def _stops(value: Optional[Union[str, list[str]]]) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not s or len(s) > 100 for s in stops):
        raise ValueError("stop strings must have 1 to 100 characters")
    return stops


Query = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS), AfterValidator(_not_blank)]
Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_not_blank)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy decoding")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="nucleus sampling mass")]
Stop = Annotated[Optional[Union[str, list[str]]], AfterValidator(_stops)]


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------------------- errors
class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---------------------------------------------------------------------------- status
class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    uptime_s: float
    models: dict[str, str] = Field(description="model name -> loaded | available | not_trained | error")


class ModelInfo(BaseModel):
    name: str
    status: Literal["loaded", "available", "not_trained", "error"]
    source: str = Field(description="file or folder the model is (or would be) loaded from")
    trained_at: Optional[str] = Field(None, description="modification time of the model file, UTC ISO 8601")
    loaded_at: Optional[str] = None
    load_seconds: Optional[float] = None
    device: Optional[str] = None
    details: dict[str, Any] = Field(default_factory=dict)
    error: Optional[str] = Field(None, description="why it is not served (names the training command)")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    generation: dict[str, dict[str, Any]] = Field(default_factory=dict, description="batching counters per language model")


# ---------------------------------------------------------------------------- search
class RagSearchRequest(StrictRequest):
    query: Query
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)
    mode: Optional[SearchModeName] = Field(None, description="dense | bm25 | hybrid (default: the index's config)")


class SearchHit(BaseModel):
    doc_id: str
    score: float
    rank: int
    text: str = Field(description="the document's best-matching chunk")
    metadata: dict[str, Any] = Field(default_factory=dict)
    dense_score: Optional[float] = None
    bm25_score: Optional[float] = None


class RagSearchResponse(BaseModel):
    query: str
    mode: str
    results: list[SearchHit]
    took_ms: float


# ---------------------------------------------------------------------------- generation
class GenerateRequest(StrictRequest):
    prompt: Prompt
    model: LanguageModelName = "mamba"
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: Temperature = 0.8
    top_p: TopP = 0.95
    stream: bool = Field(False, description="server-sent events: {text} pieces, then {done, finish_reason, ...}")
    seed: Optional[int] = Field(None, ge=0, description="same seed, same text")
    stop: Stop = None


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    took_ms: float


# ---------------------------------------------------------------------------- classification
class ClassifyRequest(StrictRequest):
    text: Optional[Text] = None
    texts: Optional[Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)]] = None

    @model_validator(mode="after")
    def _one_of_text_or_texts(self) -> "ClassifyRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        return self

    def all_texts(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str = "transformer"
    predictions: list[Prediction]
    took_ms: float


# ---------------------------------------------------------------------------- grounded answers
class QueryRequest(StrictRequest):
    query: Query
    top_k: int = Field(3, ge=1, le=MAX_QUERY_TOP_K)
    # None: the aligned (RLHF) model when one is trained, else the base Mamba (ModelRegistry.answer_model).
    model: Optional[LanguageModelName] = None
    mode: Optional[SearchModeName] = None
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Optional[int] = Field(None, ge=0)


class QueryResponse(BaseModel):
    query: str
    answer: str
    doc_ids: list[str] = Field(description="the documents whose text was in the prompt, best first")
    sources: list[SearchHit] = Field(description="everything retrieved (top_k), best first")
    model: str
    finish_reason: Literal["stop", "length"]
    took_ms: float


# ---------------------------------------------------------------------------- OpenAI-compatible
class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mark"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionRequest(OpenAIRequest):
    model: str
    prompt: Union[Prompt, Annotated[list[Prompt], Field(min_length=1, max_length=MAX_CHOICES)]]
    max_tokens: Optional[int] = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: Optional[Temperature] = 1.0
    top_p: Optional[TopP] = 1.0
    n: Optional[int] = Field(1, ge=1, le=MAX_CHOICES)
    stream: Optional[bool] = False
    stop: Stop = None
    seed: Optional[int] = Field(None, ge=0)
    stream_options: Optional[dict[str, Any]] = None
    echo: Optional[bool] = False
    logprobs: Optional[int] = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)], list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAIRequest):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: Optional[Temperature] = 1.0
    top_p: Optional[TopP] = 1.0
    n: Optional[int] = Field(1, ge=1, le=MAX_CHOICES)
    stream: Optional[bool] = False
    stop: Stop = None
    seed: Optional[int] = Field(None, ge=0)
    stream_options: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _has_text(self) -> "ChatCompletionRequest":
        if not any(m.text().strip() for m in self.messages):
            raise ValueError("messages: at least one message needs text content")
        return self


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingRequest(OpenAIRequest):
    model: str
    input: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=256)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
