"""LangChain / LangGraph integration of MARK's retriever and language models.

    from src.integrations import MARKLangChainGraph
    graph = MARKLangChainGraph(llm_model="mamba")
    graph.query("What does json.dumps do?")

``MARKRetriever`` (a LangChain ``BaseRetriever`` over the RAG index) and ``MARKLLM`` (a
LangChain ``LLM`` over a Mamba or RLHF model) can also be used on their own.
"""

from src.integrations.graph import MARKLangChainGraph
from src.integrations.llm import MARKLLM
from src.integrations.retriever import MARKRetriever

__all__ = ["MARKLLM", "MARKLangChainGraph", "MARKRetriever"]
