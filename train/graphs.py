"""CUDA-graph training steps (``cuda_graphs=true``): each batch shape's forward and backward captured once, then
replayed, so a GPU step costs a few launches of CPU time instead of one per op.

A small model's eager step is bound by Python, not the GPU (docs/BENCHMARKS.md, "Training step"). Batches are padded on the right to a multiple of SEQ_MULTIPLE tokens
(masked, so the result is the same) so that a handful of shapes cover an epoch; a batch of another size (an epoch's
last) runs eagerly. The loss, the clipping and the optimiser stay eager: they are a few launches, and the learning
rate schedule stays a Python float. Dropout is drawn afresh on every replay: torch's CUDA generator is graph-safe, and
so is the prefix kernel's dropout seed (kernels/op.py draws it on the device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import TrainError

SEQ_MULTIPLE = 16


def pad_length(ids: torch.Tensor, mask: torch.Tensor, pad_id: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, S) input_ids / attention_mask to the next multiple of SEQ_MULTIPLE tokens, at most max(S, limit)."""
    s = ids.shape[1]
    width = min(-(-s // SEQ_MULTIPLE) * SEQ_MULTIPLE, max(s, limit))
    return F.pad(ids, (0, width - s), value=pad_id), F.pad(mask, (0, width - s), value=0)


class _Forward(nn.Module):
    """One per captured shape: make_graphed_callables replaces this wrapper's forward, not the model's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


class GraphedForward:
    """``model(input_ids, attention_mask)`` for training, from a CUDA graph per (B, S) of `batch_size` rows (captured
    on first use, under the caller's autocast, which must have cache_enabled=False); other batch sizes run eagerly.
    Gradients reach the model's parameters as in eager mode; the model must stay in train mode."""

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        self.graphs: dict[tuple[int, ...], nn.Module] = {}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != self.batch_size:
            return self.model(input_ids, attention_mask)
        shape = tuple(input_ids.shape)
        graphed = self.graphs.get(shape)
        if graphed is None:
            try:  # 3 warm-up forward+backward passes (no parameter update), then the capture
                graphed = torch.cuda.make_graphed_callables(  # unused inputs: a CRF's parameters (used by the loss)
                    _Forward(self.model), (input_ids.clone(), attention_mask.clone()), allow_unused_input=True
                )
            except Exception as e:
                raise TrainError(
                    f"cuda_graphs=true: capturing the training step for batch shape {shape} failed "
                    f"({type(e).__name__}: {e}); train without cuda_graphs"
                ) from e
            self.graphs[shape] = graphed
        return graphed(input_ids, attention_mask)
