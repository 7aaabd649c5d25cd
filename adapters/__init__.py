"""The model side that training, export, the benchmarks and the kernels share: the run's configuration, the base
model and its attention hook, the methods' parts (prefix, prompt, LoRA, full and head-only), the CRF head, the
adapter files in PEFT's format, the eager reference model, and the error types.

The package's ``__init__`` imports nothing, so that a torch-free process can import ``adapters.errors`` alone.
"""
