# Two commands work on a fresh clone: `make demo` and `make test`.
# Each creates .venv if missing, installs torch pinned first (TORCH_SPEC overrides),
# then this package with the extras it needs, then runs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,sim,gym,onnx,tensorboard,mlflow
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst /,_,$(subst =,_,$(subst <,_,$(subst >,_,$(TORCH_SPEC)))))-$(subst $(comma),_,$(EXTRAS))

.PHONY: install demo test test-slow bench bench-parallel stress-parallel clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/blackbox-zo train digits

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/bench_cge.py

# Forward parallelism: 1 rank vs RANKS ranks, one thread each (run it on a quiet machine)
RANKS ?= 2
bench-parallel: install
	$(BIN)/python benchmarks/bench_parallel.py --ranks $(RANKS)

# Distributed teardown: torchrun train + resume CYCLES times, then again under CPU load (0 failures expected)
CYCLES ?= 30
stress-parallel: install
	$(BIN)/python benchmarks/stress_parallel.py --cycles $(CYCLES)
	$(BIN)/python benchmarks/stress_parallel.py --cycles $(CYCLES) --load

clean:
	rm -rf $(VENV) runs .pytest_cache
