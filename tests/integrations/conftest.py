"""The LangChain tests use the serving tests' tiny models (tests/api/fixtures.py)."""

from tests.api.fixtures import full_checkpoints, full_server, server, tiny_checkpoints  # noqa: F401
