"""Token trees as flat arrays, and the pure functions that build, lay out, prune and merge them.

Terms:
- *root*: node 0, the last token known to be correct (sampled by the target); it is not a draft.
- *draft*: every other node, a token proposed by the drafter.
- *tree node*: index i into the flat arrays; parents always precede children (topological order).
- *cumulative score*: sum of the drafter's log-probabilities along the path root -> node; it
  never increases down a path.
- *segment*: a contiguous index range [a, b) sent through the pipeline at once.
- *accepted path*: root plus the drafts the target agreed with (see engine/verify.py).
- *commit*: the accepted path joins the prefix; the survivors are re-indexed from 0.

Nothing here holds a model, a socket or a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

Order = Literal["score", "level"]


@dataclass(frozen=True, eq=False)
class TokenTree:
    """A draft tree in flat arrays; node 0 is the root."""

    tokens: np.ndarray  # [N] int64
    parents: np.ndarray  # [N] int64, -1 for the root
    depth: np.ndarray  # [N] int64, 0 for the root
    scores: np.ndarray  # [N] float64 cumulative draft log-prob, 0 for the root
    ancestors: np.ndarray  # [N, N] bool: ancestors[i, j] is True when j == i or j is an ancestor of i

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def children(self, node: int) -> np.ndarray:
        return np.flatnonzero(self.parents == node)

    def child_with_token(self, node: int, token: int) -> int | None:
        hit = np.flatnonzero((self.parents == node) & (self.tokens == token))
        return int(hit[0]) if hit.size else None

    def subtree(self, node: int) -> np.ndarray:
        """Indices of node and all its descendants, ascending."""
        return np.flatnonzero(self.ancestors[:, node])

    def path_to(self, node: int) -> np.ndarray:
        """Indices root -> node, ascending."""
        return np.flatnonzero(self.ancestors[node])

    def mask(self, start: int, end: int) -> np.ndarray:
        """Tree mask of segment [start, end): [end - start, end] bool over draft indices [0, end)."""
        return self.ancestors[start:end, :end]

    def positions(self, prefix_len: int, start: int = 0, end: int | None = None) -> np.ndarray:
        """Absolute positions of nodes [start, end): the root sits at prefix_len."""
        return prefix_len + self.depth[start:end]


def from_parents(tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float] | None = None) -> TokenTree:
    """Build a tree from topologically ordered parent pointers (parents[0] == -1)."""
    tokens_a = np.asarray(tokens, dtype=np.int64)
    parents_a = np.asarray(parents, dtype=np.int64)
    n = tokens_a.shape[0]
    if n == 0 or parents_a[0] != -1:
        raise ValueError("a tree needs a root at index 0 with parent -1")
    if np.any(parents_a[1:] >= np.arange(1, n)) or np.any(parents_a[1:] < 0):
        raise ValueError("parents must precede children")
    depth = np.zeros(n, dtype=np.int64)
    ancestors = np.zeros((n, n), dtype=bool)
    ancestors[0, 0] = True
    for i in range(1, n):
        p = parents_a[i]
        depth[i] = depth[p] + 1
        ancestors[i] = ancestors[p]
        ancestors[i, i] = True
    scores_a = np.zeros(n) if scores is None else np.asarray(scores, dtype=np.float64)
    return TokenTree(tokens_a, parents_a, depth, scores_a, ancestors)


def select_nodes(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the `budget` best pool entries: score descending, then index ascending.

    Pool entries are created parents first and scores never increase down a path, so with this
    stable tie-break a selected node's parent is always selected too (a child whose score ties
    its parent's ranks after it).
    """
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    return np.sort(order[:budget])


def layout(pool_tokens, pool_parents, pool_scores, selected: np.ndarray, order: Order) -> TokenTree:
    """Turn selected pool entries (index 0 = root, always selected) into a tree in the given order.

    "level" keeps pool order (pools are built level by level); "score" sorts by cumulative score
    descending with pool index as the tie-break. Both are topological.
    """
    selected = np.asarray(selected, dtype=np.int64)
    if order == "score":
        selected = selected[np.lexsort((selected, -pool_scores[selected]))]
    else:
        selected = np.sort(selected)
    if selected[0] != 0:
        raise ValueError("the root must come first")
    remap = {int(p): i for i, p in enumerate(selected)}
    parents = [-1] + [remap[int(pool_parents[p])] for p in selected[1:]]
    return from_parents(pool_tokens[selected], parents, pool_scores[selected])


def graft(tree: TokenTree, path: Sequence[int], path_scores: Sequence[float], budget: int,
          order: Order = "score") -> TokenTree:
    """Add a path of tokens below the root, keep the best `budget` drafts, lay them out in `order`.

    A path node the tree already has keeps the larger of its two scores; the others are added.
    path_scores must not increase along the path, so no node ever outscores its parent.
    """
    tokens, parents, scores, depth = (tree.tokens.tolist(), tree.parents.tolist(), tree.scores.tolist(),
                                      tree.depth.tolist())
    child_of = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}
    node = 0
    for tok, score in zip(path, path_scores):
        hit = child_of.get((node, int(tok)))
        if hit is None:
            hit = child_of[(node, int(tok))] = len(tokens)
            tokens.append(int(tok))
            parents.append(node)
            scores.append(float(score))
            depth.append(depth[node] + 1)
        else:
            scores[hit] = max(scores[hit], float(score))
        node = hit
    tokens_a, parents_a, scores_a = np.asarray(tokens, dtype=np.int64), np.asarray(parents), np.asarray(scores)
    chosen = np.concatenate(([0], 1 + select_nodes(scores_a[1:], budget)))
    if order == "level":  # added nodes go after the tree's, so put the pool back in level order first
        perm = np.lexsort((np.arange(len(tokens)), np.asarray(depth)))
        rank = np.argsort(perm)
        tokens_a, scores_a, chosen = tokens_a[perm], scores_a[perm], rank[chosen]
        parents_a = np.concatenate(([-1], rank[parents_a[perm][1:]]))
    return layout(tokens_a, parents_a, scores_a, chosen, order)


StepFn = Callable[[np.ndarray, np.ndarray], "np.ndarray | tuple[np.ndarray, np.ndarray]"]
"""step(tokens [k], parent_rows [k]) -> log-probs [k, V] of the children of each node, or already
their top-k as (token ids [k, K], log-probs [k, K]) per row, best first with ties to the lower id.

Rows are numbered across calls in the order they are given; parent_rows -1 means the root."""


def build_tree(root_token: int, root_logprobs: np.ndarray, step: StepFn, *, topk: int, depth: int,
               budget: int, order: Order = "score") -> TokenTree:
    """EAGLE-2 dynamic tree: expand the top-k frontier by cumulative score, keep the best `budget` drafts.

    depth counts draft levels below the root; budget counts draft nodes (the root is extra).
    """
    builder = TreeBuilder(root_token, root_logprobs, step, topk)
    builder.grow(depth)
    return builder.tree(budget, order, depth)


class TreeBuilder:
    """An EAGLE-2 candidate pool that can grow more levels and be re-selected without re-drafting.

    A drafter keeps one per root: a second draft from the same root with a larger budget only
    re-selects, and a deeper one runs only the missing levels. `tree(budget, order, depth)` equals
    what `build_tree` with those arguments returns.
    """

    def __init__(self, root_token: int, root_logprobs, step: StepFn, topk: int) -> None:
        self.step = step
        self.tokens, self.parents, self.scores, self.levels = [root_token], [-1], [0.0], [0]
        if isinstance(root_logprobs, tuple):
            self.k = int(min(topk, root_logprobs[0].shape[-1]))
            first = list(zip(root_logprobs[0][: self.k].tolist(), root_logprobs[1][: self.k].tolist()))
        else:
            self.k = int(min(topk, root_logprobs.shape[-1]))
            first = _topk(root_logprobs, self.k)
        self.frontier = []  # pool index of each frontier node
        for tok, lp in first:
            self._add(tok, 0, min(lp, 0.0), 1)
            self.frontier.append(len(self.tokens) - 1)
        self.row_of_pool = {0: -1}
        self.next_row = 0
        self.depth = 1

    def _add(self, token: int, parent: int, score: float, level: int) -> None:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.scores.append(score)
        self.levels.append(level)

    def grow(self, depth: int) -> None:
        """Expand the frontier until the pool holds `depth` draft levels."""
        while self.depth < depth and self.frontier:
            frontier = self.frontier
            rows_parent = np.array([self.row_of_pool[self.parents[p]] for p in frontier], dtype=np.int64)
            out = self.step(np.array([self.tokens[p] for p in frontier], dtype=np.int64), rows_parent)
            for p in frontier:
                self.row_of_pool[p] = self.next_row
                self.next_row += 1
            if isinstance(out, tuple):
                tops = [zip(ids[: self.k].tolist(), lps[: self.k].tolist()) for ids, lps in zip(*out)]
            else:
                tops = [_topk(row, self.k) for row in out]
            start = len(self.tokens)
            new_scores = []
            level = self.depth + 1
            for p, top in zip(frontier, tops):
                for tok, lp in top:
                    score = self.scores[p] + min(lp, 0.0)
                    self._add(tok, p, score, level)
                    new_scores.append(score)
            new_scores_a = np.asarray(new_scores)
            best = np.lexsort((np.arange(new_scores_a.shape[0]), -new_scores_a))[: self.k]
            self.frontier = [start + int(b) for b in sorted(best)]
            self.depth = level

    def tree(self, budget: int, order: Order = "score", depth: int | None = None) -> TokenTree:
        """The best `budget` drafts of the pool's first `depth` levels (all by default), laid out in `order`."""
        scores = np.asarray(self.scores)
        eligible = np.arange(1, scores.shape[0])
        if depth is not None and depth < self.depth:
            eligible = eligible[np.asarray(self.levels)[1:] <= depth]
        chosen = np.concatenate(([0], eligible[select_nodes(scores[eligible], budget)]))
        return layout(np.asarray(self.tokens, dtype=np.int64), np.asarray(self.parents), scores, chosen, order)


def _topk(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Top-k (token, log-prob) pairs, ties broken by lower token id."""
    if k < logprobs.shape[0]:
        # argpartition picks an arbitrary subset of the entries tied with the k-th largest; take the
        # lowest token ids among them so the tie-break holds at the boundary too.
        kth = -np.partition(-logprobs, k - 1)[k - 1]
        above = np.flatnonzero(logprobs > kth)
        idx = np.concatenate((above, np.flatnonzero(logprobs == kth)[: k - above.size]))
    else:
        idx = np.arange(logprobs.shape[0])
    idx = idx[np.lexsort((idx, -logprobs[idx]))]
    return [(int(i), float(logprobs[i])) for i in idx]


def chain(root_token: int, drafts: Sequence[int]) -> TokenTree:
    """A single path root -> drafts[0] -> drafts[1] ... (prompt lookup, tests)."""
    n = len(drafts) + 1
    return from_parents([root_token, *drafts], list(range(-1, n - 1)), -np.arange(n, dtype=np.float64))


def prune(tree: TokenTree, keep: Sequence[int]) -> TokenTree:
    """Sub-tree of the kept nodes (ascending; keep[0] becomes the root), re-indexed from 0."""
    keep_a = np.asarray(keep, dtype=np.int64)
    anc = tree.ancestors[np.ix_(keep_a, keep_a)]
    remap = np.full(len(tree), -1, dtype=np.int64)
    remap[keep_a] = np.arange(keep_a.shape[0])
    parents = remap[tree.parents[keep_a]]
    parents[0] = -1
    if np.any(parents[1:] < 0):
        raise ValueError("prune would orphan a node: keep must be closed under parents")
    depth = tree.depth[keep_a] - tree.depth[keep_a[0]]
    scores = tree.scores[keep_a] - tree.scores[keep_a[0]]
    return TokenTree(tree.tokens[keep_a].copy(), parents, depth, scores, anc.copy())


def merge(tree1: TokenTree, tree2: TokenTree) -> tuple[TokenTree, int]:
    """Append tree2's new nodes after tree1's (both rooted at the same token); return (tree, n_appended).

    A tree2 node whose token path already exists in tree1 maps onto it; every other node is
    appended in tree2's order, so tree1's indices, masks and positions are unchanged.
    """
    if int(tree1.tokens[0]) != int(tree2.tokens[0]):
        raise ValueError("trees to merge must share the root token")
    child_of = {(int(p), int(t)): i for i, (p, t) in enumerate(zip(tree1.parents, tree1.tokens))}
    n1 = len(tree1)
    mapped = np.zeros(len(tree2), dtype=np.int64)
    new_tokens, new_parents, new_scores = [], [], []
    base_score = float(tree1.scores[0])
    for j in range(1, len(tree2)):
        parent = int(mapped[tree2.parents[j]])
        tok = int(tree2.tokens[j])
        hit = child_of.get((parent, tok))
        if hit is None:
            hit = n1 + len(new_tokens)
            child_of[(parent, tok)] = hit
            new_tokens.append(tok)
            new_parents.append(parent)
            new_scores.append(base_score + float(tree2.scores[j]))
        mapped[j] = hit
    if not new_tokens:
        return tree1, 0
    m = len(new_tokens)
    n = n1 + m
    parents = np.concatenate((tree1.parents, np.asarray(new_parents, dtype=np.int64)))
    depth = np.concatenate((tree1.depth, np.zeros(m, dtype=np.int64)))
    ancestors = np.zeros((n, n), dtype=bool)
    ancestors[:n1, :n1] = tree1.ancestors
    for i in range(n1, n):
        p = parents[i]
        depth[i] = depth[p] + 1
        ancestors[i] = ancestors[p]
        ancestors[i, i] = True
    tokens = np.concatenate((tree1.tokens, np.asarray(new_tokens, dtype=np.int64)))
    scores = np.concatenate((tree1.scores, np.asarray(new_scores)))
    return TokenTree(tokens, parents, depth, scores, ancestors), m


def split_sizes(n: int, n_segments: int, max_size: int | None = None) -> list[int]:
    """Near-equal contiguous segment sizes for n nodes, smaller first; none larger than max_size.

    With max_size set, a tree larger than n_segments * max_size yields more segments (the caller
    keeps the surplus waiting) instead of breaking the ring.
    """
    if n <= 0:
        return []
    if max_size is not None:
        n_segments = max(n_segments, -(-n // max_size))
    n_segments = min(n_segments, n)
    base, extra = divmod(n, n_segments)
    return [base] * (n_segments - extra) + [base + 1] * extra
