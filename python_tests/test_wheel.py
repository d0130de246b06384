"""The wheel: ``pip wheel --no-build-isolation --no-deps .`` builds one that installs into a fresh
virtual environment and works there, with nothing of the source tree or the editable install leaking in.

Steps (about 1-2 min on 2 cores: the extension is compiled from scratch):

1. copy the source tree (without build outputs: ``build/``, ``*.so``, ``*.egg-info``, virtual
   environments, ``.git``) to a temporary folder and run ``pip wheel --no-build-isolation --no-deps .
   -w WHEELS`` there with the current interpreter. A copy, not the checkout itself: pip builds in
   place, and the checkout's ``build/`` folder may hold a CMake cache configured for another torch
   (e.g. the CUDA build of CI stage 2), which would break or mix the build. ``GMOD_FORCE_CPU=1``
   keeps a CUDA torch from compiling the CUDA kernels (minutes); the CUDA build has its own test.
2. make a fresh venv (``python -m venv``, with pip). It must see the *same* torch as the current
   interpreter without seeing the editable gmod_ext: ``--system-site-packages`` does not do that
   when the current interpreter is itself a venv (it exposes the base Python's packages, not this
   venv's), and exposing this venv's site-packages whole would bring the editable install's
   ``.pth`` finder with it. So the fresh venv gets a ``.pth`` pointing at a shim folder of
   symlinks to every entry of the current site-packages except gmod_ext's (its package, dist-info,
   editable finder) and the ``.pth`` files.
3. install the wheel into the fresh venv with its own pip (``--no-deps --force-reinstall``), then,
   from a temporary working directory and with ``PYTHONPATH`` / ``GMOD_EXT_LIBRARY`` unset, import
   gmod_ext and assert it comes from the fresh venv (not the source tree), that torch is the current
   interpreter's, and run a few ops against plain torch; ``python -m gmod_ext --help`` works too.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

_SKIP_TOP = {"build", "dist", ".git", ".pytest_cache", "gmod_demo_out", "out", ".whl", ".gl"}


def _ignore(dirpath: str, names: list[str]) -> set[str]:
    here = pathlib.Path(dirpath)
    out = set()
    for n in names:
        if n in ("__pycache__",) or n.endswith((".egg-info", ".so", ".pyc", ".whl")):
            out.add(n)
        elif here == ROOT and (n in _SKIP_TOP or n.startswith(".venv")):
            out.add(n)
    return out


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GMOD_EXT_LIBRARY", "PYTHONHOME")}
    env.update(extra)
    return env


def _run(cmd, cwd, timeout, **env_extra):
    proc = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=_clean_env(**env_extra), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} -> exit {proc.returncode}\n"
                                  f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def _is_gmod_entry(name: str) -> bool:
    low = name.lower().replace("-", "_")
    return low.startswith("gmod_ext") or low.startswith("__editable__") or name.endswith(".pth")


def test_wheel_installs_into_fresh_venv(tmp_path):
    pytest.importorskip("torch")
    # ---- 1. build the wheel from a clean copy of the source tree
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_ignore, symlinks=True)
    assert (src / "setup.py").exists() and (src / "csrc").is_dir() and not (src / "build").exists()
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
          ".", "-w", wheels], cwd=src, timeout=900, GMOD_FORCE_CPU="1", MAX_JOBS=str(os.cpu_count() or 2))
    found = sorted(wheels.glob("gmod_ext-*.whl"))
    assert len(found) == 1, list(wheels.iterdir())
    whl = found[0]
    import zipfile

    names = zipfile.ZipFile(whl).namelist()
    assert any(n.startswith("gmod_ext/libgmod_ext") and n.endswith(".so") for n in names), names
    for f in ("gmod_ext/__init__.py", "gmod_ext/ops.py", "gmod_ext/convert.py", "gmod_ext/costs.py",
              "gmod_ext/demo/__init__.py", "gmod_ext/demo/cli.py", "gmod_ext/bench/model.py"):
        assert f in names, f

    # ---- 2. a fresh venv that sees this interpreter's torch but not its gmod_ext
    env_dir = tmp_path / "venv"
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    except Exception as err:  # noqa: BLE001  (no ensurepip on this Python)
        pytest.skip(f"cannot create a venv with pip here: {err}")
    py = env_dir / "bin" / "python"
    assert py.exists()
    site_new = pathlib.Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 cwd=tmp_path, timeout=60).stdout.strip())
    import torch

    site_cur = pathlib.Path(torch.__file__).resolve().parents[1]
    shim = tmp_path / "shim"
    shim.mkdir()
    for entry in site_cur.iterdir():
        if _is_gmod_entry(entry.name) or entry.name == "__pycache__":
            continue
        (shim / entry.name).symlink_to(entry)
    (site_new / "_gmod_test_torch_shim.pth").write_text(str(shim) + "\n")

    # ---- 3. install the wheel with the venv's pip, then use it from outside the source tree
    _run([py, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", "--disable-pip-version-check",
          whl], cwd=tmp_path, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    check = textwrap.dedent(f"""
        import os, sys, torch
        import gmod_ext
        from gmod_ext import ops
        f = os.path.realpath(gmod_ext.__file__)
        env_dir = os.path.realpath({str(env_dir)!r})
        src = os.path.realpath({str(ROOT)!r})
        assert f.startswith(env_dir + os.sep), f"gmod_ext imported from {{f}}, not the fresh venv {{env_dir}}"
        assert not f.startswith(src + os.sep), f
        assert os.path.realpath(torch.__file__) == os.path.realpath({torch.__file__!r}), torch.__file__
        assert gmod_ext.BUILD_INFO["torch"].split("+")[0] == torch.__version__.split("+")[0], gmod_ext.BUILD_INFO
        lib = [p for p in os.listdir(os.path.dirname(f)) if p.startswith("libgmod_ext")]
        assert lib, os.listdir(os.path.dirname(f))
        torch.manual_seed(0)
        B, S, D, C = 2, 16, 32, 8
        x = torch.randn(B, S, D)
        w, nw = torch.randn(D), torch.rand(D) + 0.5
        logits = ops.router_logits(x, w, nw, eps=1e-6)
        ref = torch.nn.functional.rms_norm(x, (D,), nw, 1e-6) @ w
        assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (logits - ref).abs().max()
        idx, count = ops.route(logits, capacity=C, num_routed=C)
        top = logits.topk(C, dim=1).indices.sort(dim=1).values
        assert torch.equal(idx.long(), top) and count.tolist() == [C, C]
        h = ops.gather_rows(x, idx, count)
        assert torch.equal(h, x.gather(1, top.unsqueeze(-1).expand(B, C, D)))
        y = ops.scatter_merge(x, h, idx, count, delta=torch.tanh(h))
        exp = x.scatter(1, top.unsqueeze(-1).expand(B, C, D), h + torch.tanh(h))
        assert torch.allclose(y, exp)
        print("OK", f, gmod_ext.BUILD_INFO)
    """)
    proc = _run([py, "-c", check], cwd=work, timeout=120)
    assert proc.stdout.startswith("OK"), proc.stdout
    assert str(env_dir) in proc.stdout or os.path.realpath(env_dir) in proc.stdout
    cli = _run([py, "-m", "gmod_ext", "--help"], cwd=work, timeout=120)
    assert "demo" in cli.stdout and "arank" in cli.stdout
    # subpackages must be packed too (setuptools' `packages` lists them one by one)
    missing = [f for f in ("gmod_ext/bench/__init__.py", "gmod_ext/bench/__main__.py", "gmod_ext/bench/common.py")
               if f not in names]
    assert not missing, (f"the wheel lacks {missing}: add 'gmod_ext.bench' to [tool.setuptools] packages in "
                         "pyproject.toml (python -m gmod_ext.bench fails from a non-editable install)")
    bench = _run([py, "-m", "gmod_ext.bench", "--help"], cwd=work, timeout=120)
    assert "layer" in bench.stdout and "model" in bench.stdout
