"""HTTP routes: ``mark`` (MARK's own endpoints) and ``openai_compat`` (``/v1/...``)."""
