#!/usr/bin/env bash
# GPU check on a lent device machine (no registry access there). Run from the repository root on the device after
# the carried parts have been copied to /tmp/o (see docs/BENCHMARKS.md, "Running on a GPU host"):
#   /tmp/o/ort.part*          onnxruntime-gpu, packed by ../shared/tools/pack-ort-gpu
#   /tmp/o/minilm.part*       all-MiniLM-L6-v2 model.safetensors, split to fit the transfer limit
#   /tmp/o/assets             small files: wheels (transformers, peft, starlette, uvicorn), MiniLM tokenizer/config,
#                             BANKING77 tsv files
# Trains the default run on the GPU, exports it (CPU parity gate), checks CUDA-provider parity, benchmarks eager
# PyTorch vs onnxruntime CUDA, and writes everything under $OUT.
set -euo pipefail
source bench/device_setup.sh
python3 -c "import onnxruntime as o; o.preload_dlls(); print('providers', o.get_available_providers())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, onnxruntime; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'ort', onnxruntime.__version__)" | tee -a "$OUT/gpu.txt"
RUN=/tmp/runs/gpu
python3 -m train --run "$RUN" 2>&1 | grep -v "batch/s" | tee "$OUT/train.log"
python3 -m export --run "$RUN" 2>&1 | tee "$OUT/export.log"
python3 bench/cuda_parity.py "$RUN" 2>&1 | tee "$OUT/cuda_parity.log" || true
python3 -m bench --run "$RUN" 2>&1 | grep -v "LOAD REPORT\|^Key\|^---\|MISSING\|^Notes\|^$\|warn" | tee "$OUT/bench.log"
# the server on the GPU: fp16 graph, I/O binding, CUDA graphs per bucket (precision auto), then fp32 without graphs;
# closed-loop clients at batch 1 and 32 texts per request, concurrency 1 and 32
for variant in "fp16_graphs:--provider cuda" "fp32_nographs:--provider cuda --precision fp32 --no-cuda-graphs"; do
  name=${variant%%:*}
  python3 -m bench.loadtest --run "$RUN" --out "$OUT/served_$name" --systems serve,onnx_offline --sizes 1,32 \
    --concurrency 1,32 --duration 5 --no-overload --server-args "${variant#*:}" 2>&1 | tee "$OUT/served_$name.log" || true
done
# a bank of the run's adapter on the CUDA provider (bank tensors on the device): the served bank against the adapter's
# own export, memory and load-test throughput with 1 and 100 adapters against the single export
python3 -m export --bank /tmp/runs/banks/intents --adapters "$RUN/adapter" 2>&1 | grep -v "Shape mismatch" | tee "$OUT/bank_export.log" || true
python3 -m bench.bankload --bank /tmp/runs/banks/intents --single "$RUN/export" --run "$RUN" --sizes 1,100 --separate 1 \
  --duration 5 --out "$OUT" 2>&1 | grep -v "Shape mismatch" | tee "$OUT/bankload.log" || true
cp "$RUN/metrics.json" "$RUN/export/manifest.json" "$RUN/bench/bench.json" "$RUN/bench/latency.png" "$OUT/"
