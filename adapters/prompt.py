"""Prompt tuning and P-tuning: P virtual token embeddings prepended to the input embeddings.

PEFT semantics (checked against PEFT's own forward in tests/test_prefix.py): virtual and real tokens take positions
0..P+S-1, virtual tokens get token type 0 and are always attended to, and BERT's pooler (so the classifier) reads the
first virtual token. Both methods save one table, ``prompt_embeddings`` (P, H): for P-tuning, the encoder's output.
"""

from __future__ import annotations

import torch
from torch import nn


class PromptEmbedding(nn.Module):
    """Prompt tuning: the table itself is trained. ``init_ids`` (P,) copies those tokens' embeddings as the start."""

    def __init__(self, word_embeddings: nn.Embedding, num_virtual_tokens: int, init_ids: torch.Tensor | None) -> None:
        super().__init__()
        hidden = word_embeddings.embedding_dim
        self.embedding = nn.Embedding(num_virtual_tokens, hidden)  # N(0, 1), PEFT's "random"
        if init_ids is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(word_embeddings(init_ids).float())

    def table(self) -> torch.Tensor:
        return self.embedding.weight  # (P, H)


class PromptEncoder(nn.Module):
    """P-tuning: an embedding (P, H) reparameterised by an MLP or a bidirectional LSTM + MLP (PEFT's shapes)."""

    def __init__(self, num_virtual_tokens: int, hidden: int, encoder_hidden: int, kind: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden)
        self.kind = kind
        if kind == "lstm":
            self.lstm_head = nn.LSTM(hidden, encoder_hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * encoder_hidden, 2 * encoder_hidden), nn.ReLU(),
                                          nn.Linear(2 * encoder_hidden, hidden))  # fmt: skip
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, encoder_hidden),
                                          nn.ReLU(), nn.Linear(encoder_hidden, hidden))  # fmt: skip

    def table(self) -> torch.Tensor:
        x = self.embedding.weight  # (P, H)
        if self.kind == "lstm":
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)  # (P, 2E)
        return self.mlp_head(x)  # (P, H)


class FrozenPrompt(nn.Module):
    """A constant table (P, H), as loaded from an adapter file and as exported."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("prompt_embeddings", table.detach().float().clone())

    def table(self) -> torch.Tensor:
        return self.prompt_embeddings


def prepend_prompt(table: torch.Tensor, word_embeddings: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """inputs_embeds (B, P+S, H): the prompt table before each row's word embeddings."""
    embeds = word_embeddings(input_ids)  # (B, S, H)
    prompt = table.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)  # (B, P, H)
    return torch.cat([prompt, embeds], dim=1)
