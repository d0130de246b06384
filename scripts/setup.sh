#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with CPU torch, the build tools and the
# test/model dependencies, then build and install gmod_ext (editable) into it. Safe to re-run.
#   VENV=.venv  TORCH_SPEC="torch==2.13.0"  TRANSFORMERS_SPEC="transformers>=5.13,<5.25"  EDITABLE=1  bash scripts/setup.sh
# EDITABLE=0 installs a regular (non-editable) copy into the environment instead; DEPS_ONLY=1 stops after the
# dependencies (CI installs the CUDA environment's in the background while the CPU tests run).
# transformers has an upper bound: the newest release the tests have passed on (5.24, which renamed
# the KV cache argument past_key_values -> cache). A new release can change the Cache API under the MoD
# layers, so it is let in here, raising the bound, only once the tests pass on it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
transformers_spec=${TRANSFORMERS_SPEC:-transformers>=5.13,<5.25}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
venv=$(cd "$venv" && pwd)
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing $torch_spec and dependencies"
"${pip[@]}" install "$torch_spec" 2>&1 | grep -v "^WARNING: Location" || true
"${pip[@]}" install numpy "cmake>=3.26" ninja setuptools wheel pytest expecttest tqdm matplotlib \
  "$transformers_spec" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, transformers" || { echo "[setup] dependency install failed"; exit 1; }
if [ "${DEPS_ONLY:-0}" = 1 ]; then echo "[setup] dependencies installed in $venv"; exit 0; fi
echo "[setup] building gmod_ext against torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [ "${EDITABLE:-1}" = 1 ]; then target=(-e .); else target=(.); fi
"${pip[@]}" install --no-build-isolation "${target[@]}" 2>&1 | grep -v "^WARNING: Location" || true
(cd / && "$venv/bin/python" -c "import gmod_ext; print('[setup] gmod_ext', gmod_ext.__version__, gmod_ext.BUILD_INFO, gmod_ext.__file__)")
