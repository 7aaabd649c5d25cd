"""Bench stage: eager PyTorch adapter model vs the exported graph under onnxruntime, same process, same inputs."""
