"""gmod_ext: Mixture-of-Depths (gamma-MoD) kernels and model tooling for PyTorch.

Importing the package loads the compiled ops into ``torch.ops.gmod`` and registers their fake
kernels and autograd formulas. ``gmod_ext.ops`` holds the documented Python wrappers.
"""
from ._load import load as _load

BUILD_INFO = _load()

from . import _registry  # noqa: E402,F401  (fake kernels + autograd)
from . import ops  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ops", "BUILD_INFO", "__version__"]

# Model tooling, imported on first use so that `import gmod_ext` stays light (no transformers).
_LAZY = {
    "convert": ("convert", "convert"),
    "unconvert": ("convert", "unconvert"),
    "from_pretrained": ("convert", "from_pretrained"),
    "gmod_stats": ("convert", "gmod_stats"),
    "set_attention": ("convert", "set_attention"),
    "arank": ("arank", "arank"),
    "choose_mod_layers": ("arank", "choose_mod_layers"),
    "GmodConfig": ("config", "GmodConfig"),
    "GmodRouter": ("router", "GmodRouter"),
    "MoDDecoderLayer": ("mod_layer", "MoDDecoderLayer"),
    "make_mod_layer": ("mod_layer", "make_mod_layer"),
    "GmodCache": ("cache", "GmodCache"),
    "kv_memory_report": ("cache", "memory_report"),
    "format_memory_report": ("cache", "format_memory_report"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{mod_name}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
