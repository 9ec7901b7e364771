"""MARK's API server: ``python -m src.api.main`` (FastAPI under uvicorn).

Modules: ``main`` (command line), ``app`` (application, API-key and size guard, JSON
errors), ``schemas`` (the request/response contract), ``routes/`` (MARK's endpoints and
the OpenAI-compatible ``/v1``), ``service`` (models behind their batching workers),
``registry`` (which models, from where, loaded once), ``generation`` (continuous-batching
Mamba generation), ``batching`` (micro-batches for embeddings and classification),
``prompts`` (the layout of grounded and chat prompts).
"""
