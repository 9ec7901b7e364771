"""Fixtures of the serving tests (defined in tests/api/fixtures.py, shared with tests/integrations)."""

from tests.api.fixtures import keyed_server, server, tiny_checkpoints  # noqa: F401
