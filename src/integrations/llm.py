"""MARK's Mamba (or RLHF) language model as a LangChain LLM."""

from __future__ import annotations

from typing import Any, Iterator, Optional

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import GenerationChunk
from pydantic import ConfigDict, Field

from src.api.generation import GenerationParams, GenerationWorker


class MARKLLM(LLM):
    """Text completion with a MARK language model through its :class:`GenerationWorker`
    (the same batching engine as the API server; several LangChain calls at once share
    decoding steps). ``stop`` strings end the text; ``seed`` makes sampling repeatable;
    ``temperature=0`` is greedy."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    worker: Any = Field(description="a src.api.generation.GenerationWorker", exclude=True)
    model_name: str = "mamba"
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None
    grounded: bool = Field(False, description="prompts are retrieval-grounded: read as the model was trained on them (GenerationWorker.encode_grounded)")

    @property
    def _llm_type(self) -> str:
        return f"mark-{self.model_name}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name, "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
        }

    def _params(self, stop: Optional[list[str]], kwargs: dict[str, Any]) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=int(kwargs.get("max_new_tokens", self.max_new_tokens)),
            temperature=float(kwargs.get("temperature", self.temperature)),
            top_p=float(kwargs.get("top_p", self.top_p)),
            stop=tuple(stop or ()),
            seed=kwargs.get("seed", self.seed),
        )

    def _stream(
        self, prompt: str, stop: Optional[list[str]] = None, run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any
    ) -> Iterator[GenerationChunk]:
        worker: GenerationWorker = self.worker
        prompt_ids = worker.encode_grounded(prompt) if self.grounded else worker.encode_prompt(prompt)
        for piece in worker.stream(prompt_ids, self._params(stop, kwargs)):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk

    def _call(
        self, prompt: str, stop: Optional[list[str]] = None, run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any
    ) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))
