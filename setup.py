"""Build gmod_ext: CMake compiles csrc/ into gmod_ext/libgmod_ext.so against the installed torch.

    pip install --no-build-isolation .       # install
    pip install --no-build-isolation -e .    # editable (library built into the source tree)
    pip wheel --no-build-isolation .         # wheel

Environment: GMOD_FORCE_CPU=1 leaves the CUDA kernels out even if torch has CUDA;
TORCH_CUDA_ARCH_LIST (default "8.0;9.0") picks the GPU architectures; MAX_JOBS the parallel jobs.
"""
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent


def _tool(name):
    """The pip-installed cmake/ninja of this Python first (the system cmake may be too old), then PATH."""
    try:
        mod = __import__(name)
        exe = pathlib.Path(getattr(mod, "CMAKE_BIN_DIR" if name == "cmake" else "BIN_DIR")) / name
        if exe.exists():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch
        except ImportError:
            sys.exit("gmod_ext builds against an installed torch: `pip install torch` first, then build with "
                     "`pip install --no-build-isolation .`")
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None:
            sys.exit("gmod_ext needs cmake >= 3.26 (`pip install cmake ninja`)")
        target = pathlib.Path(self.get_ext_fullpath(ext.name)).resolve()
        # One CMake folder per torch install: a cache configured for another torch would be reused.
        tag = hashlib.sha1(f"{torch.__file__}|{torch.__version__}".encode()).hexdigest()[:10]
        build_dir = pathlib.Path(self.build_temp).resolve() / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        force_cpu = os.environ.get("GMOD_FORCE_CPU", "0") not in ("0", "", "false", "False")
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DGMOD_OUTPUT_DIR={build_dir}",
            f"-DGMOD_TORCH_HAS_CUDA={'ON' if torch.version.cuda else 'OFF'}",
            f"-DGMOD_FORCE_CPU={'ON' if force_cpu else 'OFF'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        built = build_dir / "libgmod_ext.so"
        if not built.exists():
            sys.exit(f"gmod_ext: the build finished but {built} is missing")
        # setuptools packs (and, for editable installs, copies) the file at the extension's own path.
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, target)


setup(
    ext_modules=[CMakeExtension("gmod_ext.libgmod_ext")],
    cmdclass={"build_ext": CMakeBuild},
)
