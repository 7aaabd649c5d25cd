"""The prefix path (P-tuning v2 / prefix tuning) through our own attention function.

Each layer gets P learned key/value positions. Rather than PEFT's ``past_key_values`` route (which transformers
keeps rewriting), the model passes ``prefix_kv`` as a keyword through ``BertModel.forward`` down to an attention
function registered with ``transformers.AttentionInterface``; that function prepends the layer's prefix keys and
values. The padding mask is built by ``PrefixModel`` as a 4-D boolean (B, 1, 1, P+S) tensor, which transformers passes
through untouched. Semantics follow PEFT: the prefix table ``prompt_embeddings`` (P, 2*L*H) views as (P, 2L, N, D),
index 2l is layer l's keys and 2l+1 its values, and real tokens take positions P .. P+S-1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adapters.prompt import prepend_prompt

ATTN_SDPA = "edgetune_sdpa"  # training and the eager model (export/attention.py has the exported form)


def split_prefix_table(table: torch.Tensor, num_layers: int, num_heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Turn PEFT's prefix table (P, 2*L*H) into per-layer (keys, values), each (1, N, P, D): views, split by one
    unbind (whose backward is one stack, where 2L index ops would each scatter into a zeroed table)."""
    p = table.shape[0]
    kv = table.view(p, 2 * num_layers, num_heads, -1)  # (P, 2L, N, D)
    kv = kv.permute(1, 2, 0, 3).unsqueeze(1).unbind(0)  # 2L x (1, N, P, D)
    return list(zip(kv[0::2], kv[1::2], strict=True))


class PrefixEncoder(nn.Module):
    """Trainable prefix: an embedding table (P, 2*L*H), or with projection Embedding(P, H) -> MLP -> (P, 2*L*H)."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_heads: int, hidden: int, projection_hidden: int = 0) -> None:
        super().__init__()
        self.num_layers, self.num_heads = num_layers, num_heads
        out = 2 * num_layers * hidden
        self.projection = projection_hidden > 0
        if self.projection:
            self.embedding = nn.Embedding(num_virtual_tokens, hidden)
            self.transform = nn.Sequential(nn.Linear(hidden, projection_hidden), nn.Tanh(), nn.Linear(projection_hidden, out))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out)

    def table(self) -> torch.Tensor:
        """The prefix table (P, 2*L*H): what PEFT saves as ``prompt_embeddings``."""
        t = self.embedding.weight
        return self.transform(t) if self.projection else t

    def kv(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (keys, values), each (1, N, P, D), cast to dtype in one go (not once per layer) if given."""
        table = self.table()
        return split_prefix_table(table if dtype is None else table.to(dtype), self.num_layers, self.num_heads)


class FrozenPrefix(nn.Module):
    """Constant per-layer prefix keys/values, each (1, N, P, D): what is loaded for inference and exported."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        for i, (k, v) in enumerate(kv):
            self.register_buffer(f"key_{i}", k.detach().clone().contiguous())
            self.register_buffer(f"value_{i}", v.detach().clone().contiguous())
        self.num_layers = len(kv)

    def kv(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kv = [(getattr(self, f"key_{i}"), getattr(self, f"value_{i}")) for i in range(self.num_layers)]
        return kv if dtype is None else [(k.to(dtype), v.to(dtype)) for k, v in kv]


def prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_kv=None, prefix_lengths=None,
                     prefix_kernel=True, **_):  # fmt: skip
    """Attention with the layer's prefix prepended; ``prefix_kv`` (and ``prefix_lengths``, the (B,) int32 count of
    real tokens, computed once for all layers, and ``prefix_kernel``: False keeps CUDA on the SDPA path) arrive as
    keywords from PrefixModel.forward.

    query/key/value: (B, N, S, D); attention_mask: bool (B, 1, 1, P+S), True = attend. Returns (B, S, N, D).
    """
    if prefix_kv is not None and query.is_cuda and prefix_kernel:  # the Triton kernel (kernels/), no concatenation
        # GPU only: kernels.op needs triton, which `pip install .[train]` with torch's CPU wheel does not bring
        from kernels.op import prefix_attn

        pk, pv = prefix_kv[module.layer_idx]  # (1, N, P, D)
        lengths = prefix_lengths
        if lengths is None and attention_mask is not None:  # (B,), right padding
            lengths = attention_mask[:, 0, 0, pk.shape[2] :].sum(-1, dtype=torch.int32)
        out = prefix_attn(query, key, value, pk, pv, lengths, scale=scaling, dropout_p=dropout)  # (B, N, S, D)
        return out.transpose(1, 2).contiguous(), None  # (B, S, N, D)
    return sdpa_concat_attention(module, query, key, value, attention_mask, scaling, dropout, prefix_kv)


def sdpa_concat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_kv=None, **_):
    """SDPA over concat(prefix, keys) with the extended mask: the CPU path, and PEFT's way (which the kernel replaces)."""
    if prefix_kv is not None:
        pk, pv = prefix_kv[module.layer_idx]  # (1, N, P, D)
        b = query.shape[0]
        key = torch.cat([pk.to(key.dtype).expand(b, -1, -1, -1), key], dim=2)  # (B, N, P+S, D)
        value = torch.cat([pv.to(value.dtype).expand(b, -1, -1, -1), value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, S, N, D)


def register_attention() -> None:
    """Register the attention function (idempotent), and a mask function under the same name as transformers asks
    (our 4-D mask passes through it untouched)."""
    AttentionInterface.register(ATTN_SDPA, prefix_attention)
    AttentionMaskInterface.register(ATTN_SDPA, sdpa_mask)


def _with_virtual(keep: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 1, 1, S) key mask -> (B, 1, 1, P+S): the P virtual positions are always attended to."""
    return torch.cat([torch.ones_like(keep[..., :1]).expand(-1, -1, -1, p), keep], dim=-1)


class PrefixModel(nn.Module):
    """A sequence or token classifier with an optional per-layer prefix or input prompt.

    forward(input_ids, attention_mask) -> logits (B, labels), or for a token classifier emissions (B, S, tags) over the
    real tokens only (the virtual positions of a prompt are dropped). With neither prefix nor prompt it is the plain
    model (used for LoRA, full fine-tuning and the bare-base comparison). ``crf`` (tagging) is held here so that it
    trains, saves and loads with the rest; forward does not use it. ``prefix_kernel`` False: on CUDA too, the prefix
    goes through SDPA over the concatenated keys (PEFT's way) instead of the Triton kernel.
    """

    def __init__(
        self,
        base: nn.Module,
        prefix: nn.Module | None,
        num_heads: int,
        prompt: nn.Module | None = None,
        crf: nn.Module | None = None,
        prefix_kernel: bool = True,
    ) -> None:
        super().__init__()
        self.base = base
        self.prefix_kernel = prefix_kernel
        self.prefix = prefix
        self.prompt = prompt
        self.crf = crf
        self.num_heads = num_heads
        self.num_layers = base.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        kw, virtual = {}, 0
        if self.prefix is not None:
            device = input_ids.device.type  # under autocast the attention runs in its dtype: cast the prefix once
            kv = self.prefix.kv(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
            p, s = kv[0][0].shape[2], input_ids.shape[1]
            kw["prefix_kv"] = kv
            if input_ids.is_cuda and self.prefix_kernel:  # the kernel's key padding, (B,), once for all layers
                kw["prefix_lengths"] = attention_mask.sum(-1, dtype=torch.int32)
            kw["prefix_kernel"] = self.prefix_kernel
            kw["position_ids"] = torch.arange(p, p + s, device=input_ids.device).unsqueeze(0)  # (1, S)
            keep = _with_virtual(keep, p)
        if self.prompt is not None:
            table = self.prompt.table()  # (P, H)
            p = virtual = table.shape[0]
            kw["inputs_embeds"] = prepend_prompt(table, self.base.base_model.embeddings.word_embeddings, input_ids)
            keep = _with_virtual(keep, p)
            if token_type_ids is not None:
                token_type_ids = torch.cat([torch.zeros_like(token_type_ids[:, :1]).expand(-1, p), token_type_ids], dim=1)
            input_ids = None
        logits = self.base(input_ids=input_ids, attention_mask=keep, token_type_ids=token_type_ids, **kw).logits
        return logits[:, virtual:] if logits.dim() == 3 else logits  # a token classifier: drop the virtual positions
