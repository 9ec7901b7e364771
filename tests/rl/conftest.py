"""The RL tests' fixtures live in tests/rl/fixtures.py (tests/rl/test_train.py and tests/api use them too)."""

from tests.rl.fixtures import rl_config_args, rl_data_dir, rl_rag_index, rl_retriever, rl_table  # noqa: F401
