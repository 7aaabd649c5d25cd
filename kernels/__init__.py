"""Kernels for the prefix-attention path (P-tuning v2 / prefix tuning). Their GPU benchmark is bench/kernels.py.

- ``prefix_attention.py``: the Triton kernels (forward, dropout forward, backward): prefix keys/values and sequence
  keys/values read from separate tensors in one online-softmax pass, key padding by per-row lengths, GQA, causal.
- ``op.py``: the torch custom op ``edgetune::prefix_attn`` (fake + autograd) that adapters/prefix.py uses on CUDA.
- ``reference.py``: the plain PyTorch reference (CPU path and tests).
- ``aot.py``: ahead-of-time cubins of the forward kernel for the onnxruntime custom-op library in ``ort/``.
"""
