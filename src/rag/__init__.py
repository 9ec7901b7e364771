"""Retrieval-augmented generation: chunk, embed and index documents; search and evaluate.

* :mod:`src.rag.indexer`   ``RagIndex``: build / add / delete / save / load the FAISS index
* :mod:`src.rag.retriever` ``Retriever``: dense, BM25 and hybrid search
* :mod:`src.rag.load`      ``load_rag_index``: open a built index for search
* :mod:`src.rag.eval`      ``evaluate_rag_pipeline``: recall, precision, hit rate, MRR, nDCG
* :mod:`src.rag.train`     the recipe: build or update the index, then evaluate it
"""
