"""Fixtures of the serving tests (defined in tests/api/fixtures.py, shared with tests/integrations)."""

from tests.api.fixtures import full_checkpoints, full_server, keyed_server, server, tiny_checkpoints  # noqa: F401
