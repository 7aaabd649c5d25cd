"""Trace the eager model to ONNX, apply onnxruntime's transformer fusions, and check the graph we meant to build."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from onnxruntime.transformers.optimizer import optimize_model
from torch import nn

from adapters.errors import ExportError
from adapters.prompt import prepend_prompt
from train.tagging import gather_words

OPSET = 17
INPUTS = ("input_ids", "attention_mask")
TAGGER_INPUTS = (*INPUTS, "word_index", "word_mask")


class LogitsOnly(nn.Module):
    """forward(input_ids, attention_mask) -> logits, calling a Hugging Face model by keyword."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class PromptLogits(nn.Module):
    """forward(input_ids, attention_mask) -> logits with a constant prompt (P, H) before the word embeddings.

    The model keeps transformers' own attention and 2-D mask, so onnxruntime fuses its attention as for plain BERT.
    """

    def __init__(self, model: nn.Module, table: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("prompt", table.detach().float().clone())  # (P, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = prepend_prompt(self.prompt, self.model.base_model.embeddings.word_embeddings, input_ids)  # (B, P+S, H)
        ones = torch.ones_like(attention_mask[:, :1]).expand(-1, self.prompt.shape[0])  # (B, P)
        logits = self.model(inputs_embeds=embeds, attention_mask=torch.cat([ones, attention_mask], dim=1)).logits
        return logits[:, self.prompt.shape[0] :] if logits.dim() == 3 else logits  # token classifier: real tokens only


class TaggerGraph(nn.Module):
    """forward(input_ids, attention_mask, word_index, word_mask) -> emissions (B, W, T) at each word's first piece and,
    unless ``decode`` is off, tags (B, W) (-1 on padding): the CRF's Viterbi path, or the argmax without a CRF."""

    def __init__(self, inner: nn.Module, crf: nn.Module | None, decode: bool = True) -> None:
        super().__init__()
        self.inner, self.crf, self.decode = inner, crf, decode

    def forward(self, input_ids, attention_mask, word_index, word_mask):
        emissions = gather_words(self.inner(input_ids, attention_mask), word_index)
        if not self.decode:
            return emissions
        mask = word_mask.bool()
        if self.crf is not None:
            return emissions, self.crf.decode(emissions, mask)
        return emissions, torch.where(mask, emissions.argmax(-1), -torch.ones_like(word_index))


def graph_outputs(module: nn.Module) -> list[str]:
    if isinstance(module, TaggerGraph):
        return ["emissions", "tags"] if module.decode else ["emissions"]
    return ["logits"]


def trace_to_onnx(module: nn.Module, path: Path, example_len: int = 16) -> None:
    """TorchScript-export ``module`` (dynamic batch and sequence axes): the exporter whose graphs onnxruntime fuses.

    A TaggerGraph also takes word_index / word_mask (dynamic word axis); its scripted Viterbi becomes ONNX Loops.
    """
    module.eval()
    ids = torch.ones((2, example_len), dtype=torch.long)
    mask = torch.ones((2, example_len), dtype=torch.long)
    mask[1, example_len // 2 :] = 0  # trace with padding so mask paths are kept
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    args, names = (ids, mask), list(INPUTS)
    if isinstance(module, TaggerGraph):
        words = example_len // 2
        word_index = torch.arange(1, words + 1).repeat(2, 1)
        word_mask = torch.ones((2, words), dtype=torch.long)
        word_mask[1, words // 2 :] = 0
        args, names = (ids, mask, word_index, word_mask), list(TAGGER_INPUTS)
        for name in ("word_index", "word_mask", "emissions", "tags"):
            axes[name] = {0: "batch", 1: "words"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python control flow in transformers
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=graph_outputs(module),
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def optimize(raw: Path, out: Path, num_heads: int, hidden: int, expected: dict[str, int]) -> dict[str, int]:
    """Run onnxruntime's BERT fusions and refuse a graph that lacks the fused ops we expect.

    ``expected`` maps op type -> minimum count (e.g. {"Attention": 6} for a plain 6-layer BERT). Returns the
    fused-op statistics.

    Raises:
        ExportError: a fusion we count on did not happen (rather than shipping the slow graph silently).
    """

    opt = optimize_model(str(raw), model_type="bert", num_heads=num_heads, hidden_size=hidden)
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    short = {op: (stats.get(op, 0), n) for op, n in expected.items() if stats.get(op, 0) < n}
    if short:
        found = ", ".join(f"{op} {have}/{want}" for op, (have, want) in short.items())
        raise ExportError(f"onnxruntime fusion fell short ({found}); fused ops: {stats}")
    opt.save_model_to_file(str(out))
    onnx.checker.check_model(str(out))
    return stats


def op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
