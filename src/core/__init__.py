"""MARK's shared core: configs, errors, logging, devices, checkpoint I/O and ``load_model``.

    from src.core import load_model
    model, tokenizer, device = load_model("mamba")

``load_model`` is imported here eagerly on purpose: ``src.core.load_model`` is also the name
of its module, and importing the function last makes ``src.core.load_model`` the function.
The module imports neither torch nor any component until a model is asked for.
"""

from src.core.load_model import load_model

__all__ = ["load_model"]
