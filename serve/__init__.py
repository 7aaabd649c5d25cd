"""Serve stage: an export folder -> an HTTP service on onnxruntime. No torch here."""
