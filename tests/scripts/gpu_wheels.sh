#!/usr/bin/env bash
# Wheels, in .whl/ (ignored by git), of what dist_train imports that a device machine's image lacks
# (its python3 is 3.12 with torch, numpy, PyYAML, tqdm and xxhash; no omegaconf). Run once here,
# with the registry reachable, before a session lent a GPU machine calls gpu_session.sh there:
#
#   bash tests/scripts/gpu_wheels.sh
#   device run: command "bash tests/scripts/gpu_session.sh", carry [".whl"], timeout_s 570
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
version=$("$PY" -c "import omegaconf; print(omegaconf.__version__)")
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "omegaconf==$version"
ls -l .whl
