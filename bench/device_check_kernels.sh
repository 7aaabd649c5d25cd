#!/usr/bin/env bash
# GPU check of the Triton prefix-attention kernels and the edgetune.PrefixAttention custom op on a lent device
# machine (no registry access there). Carried in, as for bench/device_check.sh: /tmp/o/ort.part* (onnxruntime-gpu),
# /tmp/o/minilm.part*, /tmp/o/assets; and build/kernels from `make kernels` on a CPU machine (the library with its
# embedded sm_80/87/90 cubins: the device has neither the onnxruntime headers nor a registry to fetch them from).
#
# Phase A, in parallel (correctness; none of it is timed):
#   kernel_tests   the gpu-marked tests of tests/test_kernels.py (compiled kernels against float64, dropout, training path)
#                  and of tests/test_train.py (CUDA-graph training steps against eager)
#   op_tests       the gpu-marked tests of tests/test_prefix_op.py and the library-loading test (its GPU branch)
#   train_export   a 1-epoch P-tuning v2 MiniLM run trained on the GPU, exported (CPU gates, model.prefix_op.onnx)
#   warm           bench.kernels with 2 iterations: compiles every kernel the timed run uses (triton's disk cache)
# Phase B, one at a time (timed):
#   kernels_bench  python -m bench.kernels: kernel vs SDPA over the concatenation / without a prefix, training step at
#                  batch 32 and 128, sequences 128-2048 (SWEEP=1 adds the block sweep, as in PART=triton)
#   prefix_op      python -m bench.prefix_op: CUDA parity of the custom-op graph, batch 1 x 128 latency with I/O binding
#   graph_train    one epoch of the default run: eager, cuda_graphs=true (train/graphs.py), and cuda_graphs=true with
#                  prefix_kernel=false (PEFT's concatenation): the issue's training comparison in the real loop
#   serve          the server on the CUDA provider with the export: /ready names the graph it chose, one /predict
# Every stage has its own time limit and runs whatever the others did; $OUT gets stages.txt (stage, exit status,
# seconds), logs.txt (every stage's output), kernels_bench.json, prefix_op_bench.json, manifest.json.
#
# PART=triton: the Triton kernels alone (kernel_tests, then kernels_bench as above; with
# SWEEP=1 SWEEP_SHARDS="0 1 2 3" the block sweep too, with PROFILE=1 a profile of one training step), in one call with
# nothing carried but the transformers and peft wheels in /tmp/o/assets/whl: torch and triton are the image's own.
set -uo pipefail
PART=${PART:-all}
if [ "$PART" = triton ]; then
  OUT=${OUT:-/tmp/out}
  mkdir -p /tmp/site "$OUT"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/o/assets/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
else
  LIB=$PWD/build/kernels/libedgetune_ort.so
  [ -f "$LIB" ] || { echo "missing $LIB: run 'make kernels' on a CPU machine and carry build/kernels" >&2; exit 2; }
  source bench/device_setup.sh
  export EDGETUNE_KERNELS="$LIB"
fi
export OUT LOGS=/tmp/logs RUN=/tmp/runs/prefix_op
mkdir -p "$LOGS"

BUDGET=${BUDGET:-570}  # seconds for the whole script: a device call is killed at 600, and $OUT must come back
stage() {  # stage NAME SECONDS CMD...: run with a time limit (cut to what is left of BUDGET), log to $LOGS/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  ((limit > BUDGET - SECONDS)) && limit=$((BUDGET - SECONDS))
  if ((BUDGET - SECONDS < 15)); then
    echo "$name skipped: ${SECONDS}s of the ${BUDGET}s budget used" | tee -a "$OUT/stages.txt"
    return 0
  fi
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/stages.txt"
  { echo "===== $name (rc=$rc, $((SECONDS - t0)) s)"; cat "$LOGS/$name.log"; } >>"$OUT/logs.txt"
}

{ nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  [ "$PART" = triton ] || python3 -c "import onnxruntime as o; o.preload_dlls(); print('ort', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$OUT/logs.txt"

PYTEST="python3 -m pytest -q -p no:cacheprovider -o addopts="
SEQS="--seqs 128 256 512 1024 2048 --plot $OUT/kernels_seq.png"  # the sequence sweep at 4096 tokens, and its plot
if [ "$PART" = triton ]; then
  stage kernel_tests 200 $PYTEST -n 8 -m gpu tests/test_kernels.py &
  for i in ${SWEEP_SHARDS:-0}; do  # SWEEP_SHARDS="0 1 2 3": compile the sweep in 4 processes (triton's disk cache)
    stage "warm$i" 150 python3 -m bench.kernels --out "/tmp/warm$i.json" --warmup 1 --iters 2 ${SWEEP:+--sweep} \
      --sweep-shard "$i/$(wc -w <<<"${SWEEP_SHARDS:-0}")" --train-batches 32 128 &
  done
  wait
  stage kernels_bench 180 python3 -m bench.kernels ${SWEEP:+--sweep} --train-batches 32 128 $SEQS --out "$OUT/kernels_bench.json"
  [ -z "${PROFILE:-}" ] || stage profile 60 python3 -m bench.kernels --profile-step --out /tmp/profile.json
  exit 0
fi

train_export() {
  set -o pipefail
  python3 -m train --run "$RUN" epochs=1 2>&1 | grep -v "batch/s" && python3 -m export --run "$RUN" --no-int8 &&
    cp "$RUN/export/manifest.json" "$OUT/"
}
export -f train_export  # run by `timeout` through bash -c
stage kernel_tests 220 $PYTEST -n 8 -m gpu tests/test_kernels.py tests/test_train.py &
stage op_tests 220 $PYTEST tests/test_prefix_op.py -k "cuda_prefix_op or library_loads_without_cuda" &
stage train_export 220 bash -c train_export &
stage warm 200 python3 -m bench.kernels --out /tmp/warm.json --warmup 1 --iters 2 ${SWEEP:+--sweep} --train-batches 32 128 &
wait

stage kernels_bench 180 python3 -m bench.kernels ${SWEEP:+--sweep} --train-batches 32 128 $SEQS --out "$OUT/kernels_bench.json"
stage prefix_op 180 python3 -m bench.prefix_op "$RUN" "$OUT/prefix_op_bench.json"

graph_train() {  # one epoch of the default run: eager, cuda_graphs=true, and cuda_graphs with PEFT's concatenation
  local args
  for mode in eager graphs graphs_concat; do
    case $mode in eager) args="" ;; graphs) args="cuda_graphs=true" ;; graphs_concat) args="cuda_graphs=true prefix_kernel=false" ;; esac
    python3 -m train --run "/tmp/runs/$mode" epochs=1 $args 2>&1 | grep -v "batch/s" || return 1
  done
  python3 - <<'EOF' | tee "$OUT/graph_train.json"
import json
keys = ("seconds_per_epoch", "samples_per_second", "test_accuracy", "peak_memory_mb", "cuda_graph_shapes")
rows = {m: {k: json.load(open(f"/tmp/runs/{m}/metrics.json"))[k] for k in keys} for m in ("eager", "graphs", "graphs_concat")}
epoch = {m: r["seconds_per_epoch"] for m, r in rows.items()}
rows["graphs_vs_eager"] = epoch["eager"] / epoch["graphs"]
rows["kernel_vs_concat_with_graphs"] = epoch["graphs_concat"] / epoch["graphs"]
print(json.dumps(rows, indent=1))
EOF
}
export -f graph_train
stage graph_train 150 bash -c graph_train

serve_check() {  # the real server process on the CUDA provider, one request
  python3 -m serve --export "$RUN/export" --provider cuda --port 8099 &
  local pid=$!
  SERVER_PID=$pid python3 - <<'EOF'
import json, os, time, urllib.request
for _ in range(120):
    os.kill(int(os.environ["SERVER_PID"]), 0)  # raises once the server has exited
    try:
        print(urllib.request.urlopen("http://127.0.0.1:8099/ready", timeout=2).read().decode())
        break
    except OSError:
        time.sleep(0.5)
req = urllib.request.Request("http://127.0.0.1:8099/predict", json.dumps({"texts": ["my card was declined", "where is my refund"]}).encode(),
                             {"Content-Type": "application/json"})
print(urllib.request.urlopen(req, timeout=10).read().decode()[:600])
EOF
  local rc=$?
  kill "$pid"
  return $rc
}
export -f serve_check
stage serve 60 bash -c serve_check
