"""Retrieval-augmented generation: chunk, embed and index documents; search and evaluate.

* :mod:`src.rag.indexer`   ``RagIndex``: build / add / delete / save / load the FAISS index
* :mod:`src.rag.retriever` ``Retriever``, ``load_rag_index``: dense, BM25 and hybrid search
* :mod:`src.rag.eval`      ``evaluate_rag_pipeline``: recall, precision, hit rate, MRR, nDCG
"""
