"""Custom kernels for the prefix-attention path (Triton; see issue 4). Empty until then: the prefix path runs
through the plain PyTorch attention function in train/prefix.py."""
