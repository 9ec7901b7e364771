"""The LangChain tests use the serving tests' tiny models (tests/api/fixtures.py)."""

from tests.api.fixtures import tiny_checkpoints  # noqa: F401
