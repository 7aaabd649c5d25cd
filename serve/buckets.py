"""Session runs at fixed shapes: the GPU fast path.

Rows are padded up to a (rows, length) bucket; each bucket has its own input and output buffers, bound to the
session once (I/O binding), so a run copies the padded inputs into them and reads the outputs back, and nothing is
allocated per run. On the CUDA provider each bucket's run is captured as an onnxruntime CUDA graph (``gpu_graph_id``)
at start and replayed. Padding changes no real row's output (the attention mask hides padded positions; a padded row
attends to its first position only), which the CPU tests check through this same class on the CPU provider.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

log = logging.getLogger("edgetune.serve")
TOKEN_INPUTS = ("input_ids", "attention_mask")
WORD_INPUTS = ("word_index", "word_mask")  # a tagger's (B, W) word positions
WORD_OUTPUTS = ("tags", "emissions")  # (B, W, ...): sliced back to the batch's words
NUMPY = {"tensor(int64)": np.int64, "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32}


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... up to max_rows (max_rows itself included)."""
    out, n = [], 1
    while n < max_rows:
        out.append(n)
        n *= 2
    return [*out, max_rows]


def length_buckets(max_length: int, step: int = 16) -> list[int]:
    """Multiples of ``step`` up to max_length (max_length itself included)."""
    return [*range(step, max_length, step), max_length]


def pick(buckets: list[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} is over the largest bucket {buckets[-1]}")


class BucketRunner:
    """``run(names, feeds)`` like ``session.run``, at the bucket above the feeds' shape."""

    def __init__(self, session: ort.InferenceSession, device: str, max_rows: int, max_length: int, pad_id: int,
                 num_labels: int, cuda_graphs: bool = False) -> None:  # fmt: skip
        self.session = session
        self.device = device
        self.rows = row_buckets(max_rows)
        self.lengths = length_buckets(max_length)
        self.pad = {"input_ids": pad_id}
        self.inputs = {i.name: NUMPY[i.type] for i in session.get_inputs()}
        self.outputs = {o.name: (NUMPY[o.type], o.shape) for o in session.get_outputs()}
        self.num_labels = num_labels  # the size of a label axis the graph leaves symbolic (a tagger's emissions)
        self.cuda_graphs = cuda_graphs
        self._buckets: dict[tuple[int, int], tuple[int, dict, dict, ort.IOBinding]] = {}

    def _bucket(self, rows: int, length: int):
        key = (rows, length)
        if key not in self._buckets:
            host = {}
            for name, dtype in self.inputs.items():
                host[name] = np.full((rows, length), self.pad.get(name, 0), dtype=dtype)
                if name in ("attention_mask", "word_mask"):
                    host[name][:, 0] = 1  # a padded row sees (and tags) its first position only
            binding = self.session.io_binding()
            device = {name: ort.OrtValue.ortvalue_from_numpy(x, self.device, 0) for name, x in host.items()}
            for name, value in device.items():
                binding.bind_ortvalue_input(name, value)
            out = {}
            for name, (dtype, shape) in self.outputs.items():
                dims = [rows, length, *shape[2:]] if name in WORD_OUTPUTS else [rows, *shape[1:]]
                dims = [d if isinstance(d, int) or i < (2 if name in WORD_OUTPUTS else 1) else self.num_labels
                        for i, d in enumerate(dims)]  # fmt: skip
                if not all(isinstance(d, int) for d in dims):
                    raise ValueError(f"output {name} has a dynamic dimension beyond the batch and words: {shape}")
                out[name] = ort.OrtValue.ortvalue_from_shape_and_type(dims, dtype, self.device, 0)
                binding.bind_ortvalue_output(name, out[name])
            self._buckets[key] = (len(self._buckets), host, (device, out), binding)
        return self._buckets[key]

    def warm_up(self) -> int:
        """Run (on CUDA: capture) every bucket once ahead of traffic; returns how many there are."""
        for rows in self.rows:
            for length in self.lengths:
                for _ in range(3 if self.cuda_graphs else 1):  # onnxruntime captures a graph after its first runs
                    self._run(*self._bucket(rows, length))
        return len(self._buckets)

    def _run(self, graph_id: int, host: dict, buffers, binding: ort.IOBinding) -> None:
        device, _ = buffers
        for name, value in device.items():
            value.update_inplace(host[name])
        options = ort.RunOptions()
        if self.cuda_graphs:
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(binding, options)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n, length = feeds["input_ids"].shape
        words = feeds["word_index"].shape[1] if "word_index" in feeds else 0
        graph_id, host, buffers, binding = self._bucket(pick(self.rows, n), pick(self.lengths, max(length, words)))
        for name, x in host.items():  # the bucket's padding, then this batch's rows over it
            x[...] = self.pad.get(name, 0)
            if name in ("attention_mask", "word_mask"):
                x[:, 0] = 1
            x[:n, : feeds[name].shape[1]] = feeds[name]
        self._run(graph_id, host, buffers, binding)
        _, out = buffers
        result = []
        for name in names:
            value = out[name].numpy()[:n]
            result.append(value[:, :words] if name in WORD_OUTPUTS else value)
        return result
