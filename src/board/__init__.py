"""MARK Board: a web UI (Gradio) to train, watch, search, chat, rate and export.

The UI is a client. Everything it does lives in plain modules that the tests call directly:
``paths`` (the allowed-root guard), ``forms`` (typed configs as form fields), ``runs``
(training runs as detached CLI subprocesses, their progress), ``history`` (finished runs,
their metrics and curves), ``knowledge`` (the RAG index), ``preferences`` (ratings as DPO
pairs), ``chat`` (grounded answers through the API's :class:`~src.api.service.ModelService`).
``tabs/`` holds one module per tab (layout and callbacks only); ``app`` builds the Blocks,
runs ``mark board`` and mounts the Board on the API server at ``/board``.
"""
