"""Find and load the compiled op library (libgmod_ext.so) into torch.ops.gmod.

The library is built by ``pip install --no-build-isolation .`` (or ``-e .``) into this package
folder. ``GMOD_EXT_LIBRARY=/path/to/libgmod_ext.so`` points at another build (used while
developing with a plain CMake build folder).
"""
from __future__ import annotations

import os
import pathlib

import torch

_REBUILD = (
    "Rebuild it against the installed torch with `pip install --no-build-isolation -e .` "
    "(or `pip install --no-build-isolation .`) from the gmod_ext source folder."
)


def library_path() -> pathlib.Path:
    override = os.environ.get("GMOD_EXT_LIBRARY")
    if override:
        return pathlib.Path(override)
    here = pathlib.Path(__file__).resolve().parent
    found = sorted(here.glob("libgmod_ext*.so")) + sorted(here.glob("libgmod_ext*.dylib"))
    if not found:
        raise ImportError(f"gmod_ext: the compiled library libgmod_ext.so is missing from {here}. {_REBUILD}")
    return found[0]


def load() -> dict:
    """Load the library once; return what it was built against ({'torch': ..., 'cuda': bool})."""
    if not _loaded():
        path = library_path()
        try:
            torch.ops.load_library(str(path))
        except OSError as err:
            raise ImportError(
                f"gmod_ext: could not load {path}: {err}. It was probably built against another torch "
                f"than the installed {torch.__version__}. {_REBUILD}"
            ) from err
    info = dict(kv.split("=", 1) for kv in torch.ops.gmod.build_info().split(";"))
    built = info["torch"].split("+")[0]
    have = torch.__version__.split("+")[0]
    if built.split(".")[:2] != have.split(".")[:2]:
        raise ImportError(f"gmod_ext: library built against torch {built}, but torch {have} is installed. {_REBUILD}")
    return {"torch": info["torch"], "cuda": info["cuda"] == "1", "sm90a": info.get("sm90a") == "1"}


def _loaded() -> bool:
    try:
        torch.ops.gmod.build_info
        return True
    except (AttributeError, RuntimeError):
        return False
