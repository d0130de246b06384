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
