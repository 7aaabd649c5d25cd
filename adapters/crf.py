"""A linear-chain CRF head over word emissions, and its Viterbi decode (scripted, so that the ONNX export
keeps the loop over words)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.jit.script
def viterbi_decode(emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor) -> Tensor:
    """Best tag path per row: emissions (B, W, T), mask (B, W) bool (words first, then padding) -> tags (B, W), -1 on
    padding. Out-of-place ops only, scripted so that the ONNX export keeps the loops over W (dynamic length).
    """
    b, t = emissions.shape[0], emissions.shape[2]
    score = start.unsqueeze(0) + emissions[:, 0]  # (B, T)
    identity = torch.arange(t, dtype=torch.long, device=emissions.device).unsqueeze(0).expand(b, t)
    history: list[Tensor] = []
    for i in range(1, emissions.shape[1]):
        step = score.unsqueeze(2) + transitions.unsqueeze(0) + emissions[:, i].unsqueeze(1)  # (B, from T, to T)
        best, idx = step.max(dim=1)
        keep = mask[:, i].unsqueeze(1)
        score = torch.where(keep, best, score)
        history.append(torch.where(keep, idx, identity))  # padding passes the tag through unchanged
    last = (score + end.unsqueeze(0)).argmax(dim=1)  # (B,)
    path = [last]
    for i in range(len(history) - 1, -1, -1):
        last = history[i].gather(1, last.unsqueeze(1)).squeeze(1)
        path.append(last)
    tags = torch.stack(path, dim=1).flip([1]).long()  # (B, W); .long() keeps the ONNX type known
    return torch.where(mask, tags, -torch.ones_like(tags))


def decode_tags(crf: CRF | None, emissions: Tensor, mask: Tensor) -> Tensor:
    """Tags (B, W), -1 on padding: the CRF's Viterbi path, or the argmax without a CRF."""
    return crf.decode(emissions, mask) if crf is not None else torch.where(mask, emissions.argmax(-1), -1)


class CRF(nn.Module):
    """A linear-chain CRF over word emissions: start, end and transition scores (T, T) [from, to]."""

    def __init__(self, num_tags: int) -> None:
        super().__init__()
        self.start = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.end = nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))

    def nll(self, emissions: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Mean negative log-likelihood of the gold paths: emissions (B, W, T), tags (B, W), mask (B, W) bool."""
        emissions = emissions.float()
        m = mask.float()
        rows = mask[:, 0]  # rows with at least one word
        gold = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # (B, W)
        score = self.start[tags[:, 0]] + (gold * m).sum(1) + (self.transitions[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        score = score + self.end[last]
        alpha = self.start.unsqueeze(0) + emissions[:, 0]  # (B, T)
        for i in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha.unsqueeze(2) + self.transitions.unsqueeze(0) + emissions[:, i].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, i].unsqueeze(1), step, alpha)
        log_z = torch.logsumexp(alpha + self.end.unsqueeze(0), dim=1)
        return ((log_z - score) * rows).sum() / rows.sum().clamp(min=1)

    def decode(self, emissions: Tensor, mask: Tensor) -> Tensor:
        return viterbi_decode(emissions.float(), mask, self.start, self.end, self.transitions)
