#!/usr/bin/env bash
# GPU check of the edgetune.PrefixAttention custom op (issue 4) on a lent device machine (no registry access there).
# Carried in, as for bench/device_check.sh: /tmp/o/ort.part* (onnxruntime-gpu), /tmp/o/minilm.part*, /tmp/o/assets; and
# build/kernels from `make kernels` on a CPU machine (the library with its embedded sm_80/87/90 cubins: the device has
# neither the onnxruntime headers nor a registry to fetch them from).
# Trains a short P-tuning v2 MiniLM run on the GPU, exports it (CPU gates, model.prefix_op.onnx included), runs the
# GPU tests of tests/test_prefix_op.py when pytest is there, then bench/prefix_op.py: CUDA parity of the custom-op
# graph (fp32 gate, fp16 vs eager) and batch 1 x 128 latency against eager PyTorch and the graph without a prefix.
# Everything lands in $OUT.
set -euo pipefail
LIB=$PWD/build/kernels/libedgetune_ort.so
[ -f "$LIB" ] || { echo "missing $LIB: run 'make kernels' on a CPU machine and carry build/kernels" >&2; exit 2; }
source bench/device_setup.sh
export EDGETUNE_KERNELS="$LIB"
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import onnxruntime as o; o.preload_dlls(); print('ort', o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"
RUN=/tmp/runs/prefix_op
python3 -m train --run "$RUN" epochs=1 2>&1 | grep -v "batch/s" | tee "$OUT/train.log"
python3 -m export --run "$RUN" --no-int8 2>&1 | tee "$OUT/export.log"
if python3 -c "import pytest" 2>/dev/null; then  # the compiled Triton kernels (outputs, gradients) and the custom op
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_prefix_op.py 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log" || true
  # and the library-loading test, which on a GPU machine takes its "CUDA device present" branch
  python3 -m pytest -q -p no:cacheprovider tests/test_prefix_op.py::test_library_loads_without_cuda 2>&1 | tail -5 | tee -a "$OUT/pytest_gpu.log" || true
fi
python3 -m kernels.bench --out "$OUT/kernels_bench.json" 2>&1 | tail -30 | tee "$OUT/kernels_bench.log" || true
python3 -m bench.prefix_op "$RUN" "$OUT/prefix_op_bench.json" 2>&1 | tee "$OUT/prefix_op_bench.log"
cp "$RUN/export/manifest.json" "$OUT/"
