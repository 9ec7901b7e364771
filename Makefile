# MARK: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-all test-ui test-rl-cartpole test-gguf bench data report serve board clean

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

# The Board in a real browser (Debian's chromium + chromium-driver, driven by Selenium); writes docs/board/*.png.
test-ui: install
	$(PY) -m pytest tests/board/test_browser.py -m ui -q

# The published-result check: PPO on CartPole-v1 with RL Zoo's tuned hyperparameters (~2 min).
test-rl-cartpole: install
	$(PY) -m pytest tests/rl/test_cartpole_slow.py -m slow -q -s

# llama.cpp runs MARK's GGUF export: same token ids on 20 texts, same 32 greedy tokens on 3
# prompts. llama-cpp-python is built from source the first time (5-15 minutes on 2 cores).
test-gguf: install
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -c constraints.txt llama-cpp-python
	$(PY) -m pytest tests/mamba/test_export_llama_cpp.py -m slow -q

test-all: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/mamba_throughput.py
	$(PY) bench/decode.py
	$(PY) bench/transformer_throughput.py
	$(PY) bench/rag.py

report: install
	$(PY) -m src.training.orchestrator report

serve: install
	$(PY) -m src.api.main

# The web UI on http://127.0.0.1:7860 (BOARD_ARGS="--port 8080 --data-root /data/docs --api-key KEY").
board: install
	$(PY) -m src.training.orchestrator board $(BOARD_ARGS)

clean:
	rm -rf checkpoints logs exports reports pipeline_output runs
