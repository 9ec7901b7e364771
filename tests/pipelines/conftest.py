"""The pipeline tests' fixtures live in tests/pipelines/fixtures.py (the load_model and report tests use them too)."""

from tests.pipelines.fixtures import tiny_data_dir, tiny_pipeline  # noqa: F401
