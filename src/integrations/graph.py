"""A LangGraph retrieve -> generate graph over MARK's RAG index and language model.

    from src.integrations import MARKLangChainGraph
    graph = MARKLangChainGraph(llm_model="mamba")            # checkpoints/rag + checkpoints/mamba
    graph.load_documents("notes/")                           # every supported file, recursively, embedded now
    graph.query("What does json.dumps do?")                  # {"answer", "doc_ids", "sources", "prompt"}
    graph.chat("What does json.dumps do?", thread_id="t1")   # remembers earlier turns of "t1"
    graph.get_conversation_history("t1"); graph.clear_memory("t1")

    # The language model behind a MARK server instead (any LangChain LLM or chat model):
    from langchain_openai import OpenAI
    remote = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY", model="mamba", temperature=0, max_tokens=64)
    graph = MARKLangChainGraph(llm=remote)

The graph's state is the question, the retrieved documents, the prompt and the answer,
plus ``history``: the turns of the conversation, kept per ``thread_id`` by a LangGraph
checkpointer (in memory) and written into the next prompt. Everything runs offline.
"""

from __future__ import annotations

import operator
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any, Optional, TypedDict

from langchain_core.documents import Document as LCDocument
from langchain_core.language_models import BaseLanguageModel
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

from src.api.generation import GenerationWorker
from src.data.prompts import ANSWER_STOP, Passage, grounded_prompt, select_passages
from src.api.registry import LANGUAGE_MODELS, ModelRegistry
from src.core.errors import ConfigError, DataError
from src.data.files import read_files
from src.data.readers import Document
from src.integrations.llm import MARKLLM
from src.integrations.retriever import MARKRetriever

DEFAULT_THREAD = "default"


class RAGState(TypedDict, total=False):
    """What flows through the graph (``history`` accumulates across the turns of a thread)."""

    question: str
    top_k: Optional[int]
    documents: list[LCDocument]
    doc_ids: list[str]
    prompt: str
    answer: str
    history: Annotated[list[dict[str, str]], operator.add]


class MARKLangChainGraph:
    """Retrieval-augmented answers and chat with MARK's models, as a LangGraph graph.

    ``llm_model``: ``auto`` (the aligned ``rlhf`` model when trained, else ``mamba``), ``mamba`` or ``rlhf``. Models come from ``checkpoints_dir`` (or an
    ``export_dir``) through :func:`src.core.load_model`; a model that is not trained is a
    ``NotTrainedError`` naming its training command. ``top_k`` documents are retrieved
    per question; ``max_history_turns`` earlier exchanges of a thread go into the prompt.
    Generation settings (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``) are the
    LLM's; ``device`` is ``auto`` (CUDA when available), ``cpu`` or ``cuda``. ``llm``: any
    LangChain LLM or chat model to generate with instead of the local one (for example
    ``langchain_openai.OpenAI`` pointed at a MARK server's ``/v1``; then no language model is
    loaded here and the generation settings are that LLM's). ``retriever``, ``llm`` and
    ``graph`` are the LangChain / LangGraph objects.
    """

    def __init__(
        self,
        llm_model: str = "auto",
        checkpoints_dir: str | Path = "checkpoints",
        export_dir: str | Path | None = None,
        top_k: int = 3,
        search_mode: Optional[str] = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
        max_history_turns: int = 4,
        device: str = "auto",
        registry: ModelRegistry | None = None,
        llm: BaseLanguageModel | None = None,
    ) -> None:
        if llm_model not in (*LANGUAGE_MODELS, "auto"):
            raise ConfigError(f"llm_model '{llm_model}': expected auto or one of {', '.join(LANGUAGE_MODELS)}")
        self.registry = registry or ModelRegistry(checkpoints_dir, export_dir, device)
        llm_model = self.registry.answer_model(llm_model)  # auto: the aligned model when trained, else the base
        self.llm_model = llm_model
        self.max_history_turns = max_history_turns
        self._index_lock = threading.RLock()
        rag = self.registry.get("rag")
        self.index = rag.model.index
        self.retriever = MARKRetriever(retriever=rag.model, top_k=top_k, mode=search_mode, lock=self._index_lock)
        self._worker: GenerationWorker | None = None
        if llm is not None:
            self.llm = llm
        else:
            lm = self.registry.get(llm_model)
            self._worker = GenerationWorker(lm.model, lm.tokenizer, llm_model)
            self.llm = MARKLLM(
                worker=self._worker, model_name=llm_model, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed, grounded=True,  # as /query reads them
            )
        self.memory = InMemorySaver()
        self._threads: set[str] = set()
        builder = self._builder()
        self.graph = builder.compile(checkpointer=self.memory)  # chat: state kept per thread
        self._one_shot = builder.compile()  # query: nothing remembered

    # ------------------------------------------------------------------ the graph
    def _builder(self) -> StateGraph:
        builder = StateGraph(RAGState)
        builder.add_node("retrieve", self._retrieve)
        builder.add_node("generate", self._generate)
        builder.add_edge(START, "retrieve")
        builder.add_edge("retrieve", "generate")
        builder.add_edge("generate", END)
        return builder

    def _retrieve(self, state: RAGState) -> dict[str, Any]:
        return {"documents": self.retriever.search(state["question"], state.get("top_k"))}

    def _generate(self, state: RAGState, config: RunnableConfig) -> dict[str, Any]:
        history = state.get("history") or []
        turns = [(t["role"], t["content"]) for t in history[-2 * self.max_history_turns :]] if self.max_history_turns else []
        passages = select_passages([Passage(d.metadata["doc_id"], d.page_content) for d in state.get("documents") or []])
        prompt = grounded_prompt(state["question"], passages, turns)
        output = self.llm.invoke(prompt, config=config, stop=list(ANSWER_STOP))
        answer = (output.content if hasattr(output, "content") else output).strip()  # a chat model answers a message
        return {
            "prompt": prompt,
            "answer": answer,
            "doc_ids": [p.doc_id for p in passages],
            "history": [{"role": "user", "content": state["question"]}, {"role": "assistant", "content": answer}],
        }

    @staticmethod
    def _result(state: dict[str, Any]) -> dict[str, Any]:
        return {
            "answer": state["answer"],
            "doc_ids": state["doc_ids"],
            "sources": [
                {
                    "doc_id": d.metadata["doc_id"], "score": d.metadata["score"], "text": d.page_content,
                    "heading_path": d.metadata["heading_path"], "source": d.metadata["source"],
                }
                for d in state.get("documents") or []
            ],
            "prompt": state["prompt"],
        }

    # ------------------------------------------------------------------ questions
    def query(self, question: str, top_k: int | None = None, config: RunnableConfig | None = None) -> dict[str, Any]:
        """Answer one question from the retrieved documents (no conversation memory).

        Returns ``{"answer", "doc_ids" (documents in the prompt), "sources" (retrieved:
        doc_id, score, text, heading_path, source), "prompt"}``. ``config`` is passed to LangGraph (callbacks, ...).
        """
        _check_text(question, "question")
        return self._result(self._one_shot.invoke({"question": question, "top_k": top_k}, config))

    def chat(self, message: str, thread_id: str = DEFAULT_THREAD, top_k: int | None = None, config: RunnableConfig | None = None) -> dict[str, Any]:
        """One conversation turn: earlier turns of ``thread_id`` are in the prompt, and this
        one is remembered. Returns what :meth:`query` returns plus ``thread_id``."""
        _check_text(message, "message")
        run_config: dict[str, Any] = dict(config or {})
        run_config["configurable"] = {**(run_config.get("configurable") or {}), "thread_id": thread_id}
        self._threads.add(thread_id)
        state = self.graph.invoke({"question": message, "top_k": top_k}, run_config)
        return {**self._result(state), "thread_id": thread_id}

    def search(self, query: str, top_k: int | None = None) -> list[LCDocument]:
        """The retrieved documents for ``query`` (LangChain ``Document`` objects)."""
        _check_text(query, "query")
        return self.retriever.search(query, top_k)

    # ------------------------------------------------------------------ memory
    def get_conversation_history(self, thread_id: str = DEFAULT_THREAD) -> list[dict[str, str]]:
        """The turns of ``thread_id`` so far: ``[{"role": "user"|"assistant", "content"}, ...]``."""
        snapshot = self.graph.get_state({"configurable": {"thread_id": thread_id}})
        return list((snapshot.values or {}).get("history") or [])

    def clear_memory(self, thread_id: str | None = None) -> None:
        """Forget one thread's conversation, or every thread's when ``thread_id`` is None."""
        threads = list(self._threads) if thread_id is None else [thread_id]
        for thread in threads:
            self.memory.delete_thread(thread)
            self._threads.discard(thread)

    # ------------------------------------------------------------------ documents
    def add_documents(self, documents: list[Document | dict]) -> list[str]:
        """Embed and index ``documents`` (``Document`` or ``{id, text, metadata}``); returns their ids.

        An id already in the index is a ``DataError`` (ids are unique in the index).
        """
        docs = [d if isinstance(d, Document) else Document.model_validate(d) for d in documents]
        if not docs:
            return []
        with self._index_lock:
            self.index.add_documents(docs)
        return [d.id for d in docs]

    def add_document(self, text: str, doc_id: str | None = None, metadata: dict[str, Any] | None = None) -> str:
        """Index one text now; returns its id (a new unique one when ``doc_id`` is None)."""
        _check_text(text, "text")
        doc_id = doc_id or f"doc-{uuid.uuid4().hex[:12]}"
        return self.add_documents([Document(id=doc_id, text=text, metadata=metadata or {})])[0]

    def load_documents(
        self,
        path: str | Path | list[str | Path],
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
    ) -> list[str]:
        """Index files and folders (recursively, any mix of the formats of :mod:`src.data.files`:
        txt, md, rst, html, pdf, docx, csv/tsv, jsonl/json, parquet, datasets folders); returns
        the new ids (a file's path relative to the folder given, ``report.pdf#p3`` per PDF page,
        a row's id column). ``include`` / ``exclude``: glob patterns. A file that cannot be read
        is an ``UnreadableFileError`` naming it; nothing is indexed then."""
        return self.add_documents(read_files(path, include, exclude))

    def save_index(self, checkpoint_dir: str | Path) -> dict[str, Path]:
        """Write the index, with the documents added here, to ``checkpoint_dir``."""
        with self._index_lock:
            return self.index.save(checkpoint_dir)

    def close(self) -> None:
        """Stop the generation thread (if this graph runs the language model itself)."""
        if self._worker is not None:
            self._worker.close()


def _check_text(value: str, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{name} must be a non-empty string")
