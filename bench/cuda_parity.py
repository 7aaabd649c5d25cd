"""Parity of the exported fp32 graph under onnxruntime's CUDA provider against the eager model on the GPU.

Usage: python bench/cuda_parity.py RUN  (on a machine with a GPU and onnxruntime-gpu)
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort
import torch
from transformers import AutoTokenizer

from adapters.eager import load_adapter_model
from export.parity import check_parity
from serve.runtime import Classifier
from train.splits import parity_texts


def main(run: Path) -> None:
    ort.preload_dlls()
    export_dir = run / "export"
    eager = load_adapter_model(run / "adapter").cuda().eval()
    bare = load_adapter_model(run / "adapter").cuda().eval()
    bare.prefix = None
    tok = AutoTokenizer.from_pretrained(export_dir)
    for tf32, tolerance in ((False, None), (True, 5e-2)):  # the gate as served, then TF32 for the record
        providers = [("CUDAExecutionProvider", {"use_tf32": int(tf32)})]
        sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=providers)
        assert sess.get_providers()[0] == "CUDAExecutionProvider", sess.get_providers()
        with torch.inference_mode():
            p = check_parity(sess, eager, bare, tok, parity_texts(run), 64, tolerance=tolerance)
        print(
            f"CUDA EP fp32 (tf32={tf32}) vs eager CUDA fp32: max |diff| {p.max_abs_diff:.2e}, argmax agree "
            f"{p.argmax_agree:.0%}, n={p.n_samples}, batches {p.batch_sizes}, adapter effect {p.adapter_effect:.2f}"
        )
    c = Classifier(export_dir, providers="cuda")
    print("serve runtime on", c.provider, c.classify(["I lost my card", "how do I top up?"])[0]["label"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
