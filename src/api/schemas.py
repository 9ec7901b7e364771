"""Request and response models of the API server: these classes are the HTTP contract.

MARK's own endpoints (``/rag-search``, ``/generate``, ``/classify``, ``/query``) take
strict JSON: unknown fields, wrong types (``"5"`` for an integer) and blank strings are
refused with 422. The OpenAI-compatible endpoints (``/v1/...``) follow OpenAI's request
shapes and ignore fields MARK does not use, so standard clients work unchanged.
Every error, whatever the endpoint, is ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

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
MAX_PROMPTS = 32  # prompts in one completions request (evaluation harnesses batch them)
MAX_MESSAGES = 64
MAX_STOP_CHARS = 100
MAX_SEED = 2**63 - 1  # torch generators take a 64-bit seed
MAX_LOGPROBS = 5  # OpenAI's limit for completions' ``logprobs``
MAX_TOP_LOGPROBS = 20  # and for chat's ``top_logprobs``
MAX_PROMPT_IDS = 16_384
MAX_TOKEN_ID = 1_000_000  # the served tokenizer's real limit replaces it in /openapi.json
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_SCORE_PAIRS = 64
# JSON-schema extension keys: /openapi.json fills in the loaded models' numbers (src/api/app.py).
TOKEN_ID_MARK = "x-mark-token-id"
EMBEDDING_DIM_MARK = "x-mark-embedding-dim"
EMBEDDING_MODEL_MARK = "x-mark-embedding-model"
LANGUAGE_MODEL_IDS = ["mamba", "rlhf"]

LanguageModelName = Literal["mamba", "rlhf"]
SearchModeName = Literal["dense", "bm25", "hybrid", "convex-0", "convex-0.25", "convex-0.5", "convex-0.75", "convex-1", "auto"]
SEARCH_MODE_HELP = ("dense | bm25 | hybrid (RRF) | convex-<w> (score fusion, w in 0, 0.25, 0.5, 0.75, 1) | auto (the trained "
                    "retrieval policy picks the mode and how many documents, at most top_k); default: the index's config")


# "Not blank" is a regular expression so that the OpenAPI schema states it (``pattern``) and
# schema-driven clients and fuzzers generate what validation accepts. It lists the blank
# characters instead of using ``\S``, whose meaning differs between Python's ``re`` and the
# ECMA-262 regexes of JSON Schema (U+0085, U+001C..U+001F): the same class everywhere.
NOT_BLANK = r"[^ \t\n\r\f\v]"
_NOT_BLANK = re.compile(NOT_BLANK)


def _not_blank(value: str) -> str:
    if not _NOT_BLANK.search(value):
        raise ValueError("must not be empty or only whitespace")
    return value


def _text(max_chars: int, description: str | None = None):
    return Annotated[
        str,
        Field(min_length=1, max_length=max_chars, description=description, json_schema_extra={"pattern": NOT_BLANK}),
        AfterValidator(_not_blank),
    ]


def _json_integer(value: Any) -> Any:
    """JSON has one number type: ``5.0`` is the integer 5 (as JSON Schema's ``integer`` says);
    strings and booleans stay what they are and strict validation refuses them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field: 5 and 5.0 are accepted; "5", true and 5.5 are not.
Int = Annotated[int, BeforeValidator(_json_integer)]


def _stops(value: Optional[Union[str, list[str]]]) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


Query = _text(MAX_QUERY_CHARS)
Prompt = _text(MAX_PROMPT_CHARS)
Text = _text(MAX_TEXT_CHARS)
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy decoding")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="nucleus sampling mass")]
Seed = Annotated[Int, Field(ge=0, le=MAX_SEED, description="same seed, same text")]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Annotated[
    Optional[Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]]],
    AfterValidator(_stops),
    Field(description=f"up to {MAX_STOP_STRINGS} strings that end the text (not included in it)"),
]
TokenId = Annotated[Int, Field(ge=0, le=MAX_TOKEN_ID, json_schema_extra={TOKEN_ID_MARK: True})]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_IDS)]


class StrictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OpenAIRequest(BaseModel):
    # Fields MARK does not use are ignored (standard clients send them); the ones it uses are
    # typed strictly, as the schema says ("5" is not an integer).
    model_config = ConfigDict(extra="ignore", strict=True)


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
    ready: bool = Field(description="every trained model loaded and warmed up (always true without preloading)")
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
    top_k: Int = Field(5, ge=1, le=MAX_TOP_K)
    mode: Optional[SearchModeName] = Field(None, description=SEARCH_MODE_HELP)


class SearchHit(BaseModel):
    doc_id: str
    score: float
    rank: int
    text: str = Field(description="the document's best-matching chunk")
    metadata: dict[str, Any] = Field(default_factory=dict)
    dense_score: Optional[float] = None
    bm25_score: Optional[float] = None
    heading_path: list[str] = Field(default_factory=list, description="the headings the chunk sits under (empty when none)")
    source: Optional[str] = Field(None, description="the file the document came from, relative to the ingested folder")


class RagSearchResponse(BaseModel):
    query: str
    mode: str = Field(description="the search mode used (with mode auto: the one the retrieval policy chose)")
    strategy: Optional[str] = Field(None, description="mode auto: the policy's choice as mode@k, else null")
    results: list[SearchHit]
    took_ms: float


# ---------------------------------------------------------------------------- generation
class GenerateRequest(StrictRequest):
    prompt: Prompt
    model: LanguageModelName = "mamba"
    max_new_tokens: Int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: Temperature = 0.8
    top_p: TopP = 0.95
    stream: bool = Field(False, description="server-sent events: {text} pieces, then {done, finish_reason, ...}")
    seed: Optional[Seed] = None
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
    # The schema says what the validator checks: exactly one of the two fields.
    model_config = ConfigDict(
        extra="forbid", strict=True,
        json_schema_extra={"oneOf": [
            {"required": ["text"], "properties": {"text": {"type": "string"}}},
            {"required": ["texts"], "properties": {"texts": {"type": "array"}}},
        ]},
    )

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
    top_k: Int = Field(3, ge=1, le=MAX_QUERY_TOP_K)
    # None: the aligned (RLHF) model when one is trained, else the base Mamba (ModelRegistry.answer_model).
    model: Optional[LanguageModelName] = None
    mode: Optional[SearchModeName] = Field(None, description=SEARCH_MODE_HELP)
    max_new_tokens: Int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Optional[Seed] = None
    evidence_k: Int = Field(3, ge=0, le=MAX_QUERY_TOP_K, description="evidence sentences returned at most")


class EvidenceSentence(BaseModel):
    doc_id: str
    sentence: str
    score: float = Field(description="cosine similarity of the sentence and the query under the RAG encoder")


class QueryResponse(BaseModel):
    query: str
    answer: str
    answer_empty: bool = Field(description="the model generated no text (the answer is the empty string)")
    answer_cut_off: bool = Field(description="generation stopped at max_new_tokens: the answer may be unfinished")
    evidence: list[EvidenceSentence] = Field(
        description="the sentences of the retrieved chunks that best match the query, best first (extractive)"
    )
    doc_ids: list[str] = Field(description="the documents whose text was in the prompt, best first")
    sources: list[SearchHit] = Field(description="everything retrieved (top_k), best first")
    model: str
    mode: Optional[str] = Field(None, description="the search mode used (with mode auto: the one the retrieval policy chose)")
    strategy: Optional[str] = Field(None, description="mode auto: the retrieval policy's choice as mode@k, else null")
    finish_reason: Literal["stop", "length"]
    took_ms: float


# ---------------------------------------------------------------------------- tokenizer
class TokenizeRequest(StrictRequest):

    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
    model: LanguageModelName = "mamba"
    add_special_tokens: bool = Field(True, description="put <|bos|> first, as the server does for a text prompt")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    token_strs: list[str]
    count: int
    max_model_len: Optional[Int] = Field(None, description="the longest prompt this server reads, in tokens")


class DetokenizeRequest(StrictRequest):

    tokens: Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]
    model: LanguageModelName = "mamba"


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model: str
    tokenizer_class: str
    vocab_size: int
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    model_max_length: int


# ---------------------------------------------------------------------------- reward scores
class ScorePair(StrictRequest):

    prompt: Prompt
    response: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ScoreRequest(StrictRequest):

    model: Literal["reward"] = "reward"
    input: Annotated[list[ScorePair], Field(min_length=1, max_length=MAX_SCORE_PAIRS)]


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    scores: list[float] = Field(description="the reward model's normalized score of each pair, in order")
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: Optional[bool] = Field(None, description="a last chunk with the usage of the whole request")


# The OpenAI routes answer an unknown model with 404 (OpenAI's NotFoundError), not 422, so the
# field is a string; the schema lists the ids served.
OpenAILanguageModel = Annotated[str, Field(json_schema_extra={"enum": LANGUAGE_MODEL_IDS}, description="mamba or rlhf")]


class CompletionRequest(OpenAIRequest):
    model: OpenAILanguageModel
    prompt: Union[
        Prompt,
        Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)],
        TokenIds,
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)],
    ] = Field(description="a string, a list of strings, a list of token ids, or a list of such lists")
    max_tokens: Optional[Int] = Field(16, ge=0, le=MAX_NEW_TOKENS, description="0 with echo: only score the prompt")
    temperature: Optional[Temperature] = 1.0
    top_p: Optional[TopP] = 1.0
    n: Optional[Int] = Field(1, ge=1, le=MAX_CHOICES)
    stream: Optional[bool] = False
    stop: Stop = None
    seed: Optional[Seed] = None
    stream_options: Optional[StreamOptions] = None
    echo: Optional[bool] = Field(False, description="put the prompt (and, with logprobs, its tokens' logprobs) first")
    logprobs: Optional[Int] = Field(None, ge=0, le=MAX_LOGPROBS, description="the N most likely tokens at each position")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]] = Field(description="null for a token with nothing before it")
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)],
        Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)],
        None,
    ] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAIRequest):
    model: OpenAILanguageModel
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Optional[Int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: Optional[Int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: Optional[Temperature] = 1.0
    top_p: Optional[TopP] = 1.0
    n: Optional[Int] = Field(1, ge=1, le=MAX_CHOICES)
    stream: Optional[bool] = False
    stop: Stop = None
    seed: Optional[Seed] = None
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[bool] = Field(False, description="the logprob of each generated token")
    top_logprobs: Optional[Int] = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="and the N most likely tokens at each position (implies logprobs)"
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def embedding_model_ids(encoder_name: str) -> list[str]:
    """The model ids ``/v1/embeddings`` accepts: ``minilm`` and the encoder's names."""
    return list(dict.fromkeys(["minilm", encoder_name, encoder_name.rsplit("/", 1)[-1]]))


class EmbeddingRequest(OpenAIRequest):
    model: Annotated[str, Field(
        json_schema_extra={EMBEDDING_MODEL_MARK: True},
        description="minilm, or the RAG encoder's name (/openapi.json lists them once it is loaded)",
    )]
    input: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=256)]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[Int] = Field(
        None, ge=1, le=MAX_EMBEDDING_DIMENSIONS, json_schema_extra={EMBEDDING_DIM_MARK: True},
        description="must be the encoder's size (/openapi.json gives it once the encoder is loaded)",
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
