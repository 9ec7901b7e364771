# MARK: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-all test-rl-cartpole bench data report serve clean

# torch is installed first, pinned by constraints.txt, so that no dependency pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

data: install
	$(PY) -m src.data.prepare

demo: install
	$(PY) -m src.pipelines.full_pipeline --device cpu --config-dir configs/demo

test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

# The published-result check: PPO on CartPole-v1 with RL Zoo's tuned hyperparameters (~2 min).
test-rl-cartpole: install
	$(PY) -m pytest tests/rl/test_cartpole_slow.py -m slow -q -s

test-all: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/mamba_throughput.py
	$(PY) bench/transformer_throughput.py
	$(PY) bench/rag.py

report: install
	$(PY) -m src.training.orchestrator report

serve: install
	$(PY) -m src.api.main

clean:
	rm -rf checkpoints logs exports reports pipeline_output
