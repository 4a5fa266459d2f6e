"""Acceptance of draft tokens against the target, as pure functions.

Terms (see engine/tree.py for the tree ones):
- *verified node*: a tree node whose target distribution is known (its segment came back);
  verified nodes are always the index prefix [0, M).
- *accepted path*: the root plus the drafts accepted one after another, each a child of the
  previous one, all verified except possibly none.
- *bonus token*: the token the target chooses after the last accepted node.
- *next node*: the tree node carrying the bonus token when it exists but is not verified yet; the
  pipeline then continues with it as the new root instead of starting a new tree.
- *commit*: the accepted path joins the prefix (done by the coordinator).

Greedy acceptance follows the target's argmax. Stochastic acceptance (temperature > 0) tries the
children of each accepted node in index order and accepts child x with probability p(x) under
the residual distribution p, removing x from p on rejection; when every child is rejected, the
bonus token is sampled from what remains. Because the candidates are a deterministic function of
the context, every committed token is distributed exactly as the target's own sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.tree import TokenTree


@dataclass(frozen=True)
class Accepted:
    path: tuple[int, ...]  # node indices, root first
    bonus_token: int
    next_node: int | None  # unverified tree node carrying bonus_token, else None (new tree)

    @property
    def n_drafts(self) -> int:
        return len(self.path) - 1


def accept_greedy(tree: TokenTree, target_tokens: np.ndarray) -> Accepted:
    """target_tokens: [M] the target's argmax at verified nodes 0..M-1 (M >= 1)."""
    m = int(target_tokens.shape[0])
    node, path = 0, [0]
    while True:
        token = int(target_tokens[node])
        child = tree.child_with_token(node, token)
        if child is None:
            return Accepted(tuple(path), token, None)
        if child >= m:
            return Accepted(tuple(path), token, child)
        path.append(child)
        node = child


def accept_stochastic(tree: TokenTree, target_probs: torch.Tensor, generator: torch.Generator) -> Accepted:
    """target_probs: [M, V] the target's (temperature-scaled) distribution at verified nodes 0..M-1."""
    m = int(target_probs.shape[0])
    node, path = 0, [0]
    while True:
        residual = target_probs[node].clone()
        chosen = None
        for child in tree.children(node):
            token = int(tree.tokens[child])
            total = float(residual.sum())
            p = float(residual[token]) / total if total > 0 else 0.0
            if float(torch.rand((), generator=generator)) < p:
                chosen = int(child)
                break
            residual[token] = 0.0
        if chosen is None:
            if float(residual.sum()) <= 0:
                residual = target_probs[node]
            token = int(torch.multinomial(residual, 1, generator=generator))
            return Accepted(tuple(path), token, None)
        if chosen >= m:
            return Accepted(tuple(path), int(tree.tokens[chosen]), chosen)
        path.append(chosen)
        node = chosen


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities at the given temperature (> 0)."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, torch.full_like(logits, -float("inf")), logits)
    return torch.softmax(logits, dim=-1)
