"""Export stage: adapter folder -> parity-checked ONNX folder (model.onnx + tokenizer + manifest.json)."""
