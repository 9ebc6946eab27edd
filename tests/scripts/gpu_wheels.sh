#!/usr/bin/env bash
# Wheels, in .whl/ (ignored by git), of what dist_train imports that a device machine's image lacks
# (its python3 is 3.12 with torch, torchvision, numpy, PyYAML, tqdm, xxhash, einops, msgpack, ninja,
# psutil and py-cpuinfo; no omegaconf, no DeepSpeed, hjson or pydantic). Run once here,
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
# DeepSpeed (gpu_check's ZeRO-3 case) is an sdist on PyPI: built here without its ops (pure Python,
# py3-none-any; it builds its kernels just in time where it needs them), with the same versions of
# what it needs that the image lacks.
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(ver deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "hjson==$(ver hjson)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic-core)" \
    "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)"
ls -l .whl
