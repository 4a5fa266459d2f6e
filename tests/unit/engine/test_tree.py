"""engine.tree: hand-built trees with exact arrays, and seeded property checks of the tree algorithms.

Terms follow engine/tree.py (root, draft, tree node, cumulative score, segment). Trees here have
3-10 nodes unless a property is checked over seeded random ones; no model weights are involved.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.tree import (
    TokenTree,
    _topk,
    build_tree,
    chain,
    from_parents,
    graft,
    layout,
    merge,
    prune,
    select_nodes,
    split_sizes,
)

# --- helpers


def assert_well_formed(tree: TokenTree) -> None:
    """FLOWSPEC §11.3: topological, depth = parent's + 1, mask = ancestors ∪ self, siblings distinct."""
    n = len(tree)
    assert tree.parents[0] == -1 and tree.depth[0] == 0
    assert tree.tokens.shape == tree.parents.shape == tree.depth.shape == tree.scores.shape == (n,)
    assert tree.ancestors.shape == (n, n) and tree.ancestors.dtype == bool
    for i in range(1, n):
        p = int(tree.parents[i])
        assert 0 <= p < i, f"node {i} has parent {p}: not topological"
        assert tree.depth[i] == tree.depth[p] + 1
    expected = np.zeros((n, n), dtype=bool)
    for i in range(n):
        j = i
        while j != -1:
            expected[i, j] = True
            j = int(tree.parents[j])
    np.testing.assert_array_equal(tree.ancestors, expected)
    assert tree.ancestors[:, 0].all()
    for i in range(n):
        kids = tree.children(i)
        assert len(set(tree.tokens[kids].tolist())) == kids.size, f"node {i} has two children with one token"


def token_path(tree: TokenTree, node: int) -> tuple[int, ...]:
    return tuple(int(t) for t in tree.tokens[tree.path_to(node)])


def random_tree(rng: np.random.Generator, n: int, vocab: int, root_token: int = 0) -> TokenTree:
    """A random topological tree whose siblings carry distinct tokens from range(vocab)."""
    parents, tokens = [-1], [root_token]
    for i in range(1, n):
        while True:
            p = int(rng.integers(0, i))
            used = {tokens[j] for j in range(i) if parents[j] == p}
            free = [t for t in range(vocab) if t not in used]
            if free:
                break
        parents.append(p)
        tokens.append(int(rng.choice(free)))
    return from_parents(tokens, parents)


# Tree A (7 nodes), level order:         0:100
#                                   1:11         2:12
#                                3:13   4:14       5:15
#                               6:16
A_TOKENS = [100, 11, 12, 13, 14, 15, 16]
A_PARENTS = [-1, 0, 0, 1, 1, 2, 3]
A_DEPTH = [0, 1, 1, 2, 2, 2, 3]
A_ANCESTORS = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1],
    ],
    dtype=bool,
)


@pytest.fixture
def tree_a() -> TokenTree:
    return from_parents(A_TOKENS, A_PARENTS, [0.0, -0.5, -1.0, -0.7, -2.0, -1.5, -0.9])


# --- from_parents, accessors, chain


def test_from_parents_gives_exact_depth_and_ancestors(tree_a):
    np.testing.assert_array_equal(tree_a.tokens, A_TOKENS)
    np.testing.assert_array_equal(tree_a.parents, A_PARENTS)
    np.testing.assert_array_equal(tree_a.depth, A_DEPTH)
    np.testing.assert_array_equal(tree_a.ancestors, A_ANCESTORS)
    assert tree_a.tokens.dtype == np.int64 and tree_a.parents.dtype == np.int64
    assert len(tree_a) == 7
    assert_well_formed(tree_a)


def test_scores_default_to_zero():
    tree = from_parents([5, 6, 7], [-1, 0, 0])
    np.testing.assert_array_equal(tree.scores, [0.0, 0.0, 0.0])


def test_mask_rows_are_ancestors_and_self_over_columns_below_segment_end(tree_a):
    mask = tree_a.mask(2, 5)  # [3, 5] bool
    np.testing.assert_array_equal(
        mask,
        [
            [1, 0, 1, 0, 0],  # node 2: root, itself
            [1, 1, 0, 1, 0],  # node 3: root, 1, itself
            [1, 1, 0, 0, 1],  # node 4: root, 1, itself
        ],
    )
    np.testing.assert_array_equal(tree_a.mask(0, 7), A_ANCESTORS)
    np.testing.assert_array_equal(tree_a.mask(0, 1), [[1]])
    np.testing.assert_array_equal(tree_a.mask(6, 7), [[1, 1, 0, 1, 0, 0, 1]])
    for a in range(7):
        for b in range(a + 1, 8):
            assert tree_a.mask(a, b).shape == (b - a, b)
            assert tree_a.mask(a, b)[:, 0].all()


def test_positions_are_prefix_len_plus_depth(tree_a):
    np.testing.assert_array_equal(tree_a.positions(10), [10, 11, 11, 12, 12, 12, 13])
    np.testing.assert_array_equal(tree_a.positions(10, 2, 5), [11, 12, 12])
    np.testing.assert_array_equal(tree_a.positions(0, 6), [3])


def test_children_subtree_path_and_child_with_token(tree_a):
    np.testing.assert_array_equal(tree_a.children(0), [1, 2])
    np.testing.assert_array_equal(tree_a.children(1), [3, 4])
    assert tree_a.children(6).size == 0
    np.testing.assert_array_equal(tree_a.subtree(1), [1, 3, 4, 6])
    np.testing.assert_array_equal(tree_a.subtree(2), [2, 5])
    np.testing.assert_array_equal(tree_a.subtree(6), [6])
    np.testing.assert_array_equal(tree_a.path_to(6), [0, 1, 3, 6])
    np.testing.assert_array_equal(tree_a.path_to(0), [0])
    assert tree_a.child_with_token(1, 14) == 4
    assert tree_a.child_with_token(1, 15) is None  # 15 is a grandchild of the root, not a child of 1
    assert tree_a.child_with_token(0, 100) is None


@pytest.mark.parametrize(
    "tokens, parents",
    [
        ([], []),
        ([1, 2], [0, 0]),  # the root has a parent
        ([1, 2, 3], [-1, 0, 2]),  # a node is its own parent
        ([1, 2, 3], [-1, 2, 0]),  # a parent comes after its child
        ([1, 2, 3], [-1, 0, -1]),  # a second root
    ],
)
def test_from_parents_rejects_non_topological_input(tokens, parents):
    with pytest.raises(ValueError):
        from_parents(tokens, parents)


def test_chain_is_a_single_path():
    tree = chain(5, [6, 7, 8])
    np.testing.assert_array_equal(tree.tokens, [5, 6, 7, 8])
    np.testing.assert_array_equal(tree.parents, [-1, 0, 1, 2])
    np.testing.assert_array_equal(tree.depth, [0, 1, 2, 3])
    np.testing.assert_array_equal(tree.ancestors, np.tril(np.ones((4, 4), dtype=bool)))
    assert np.all(np.diff(tree.scores) < 0)
    assert_well_formed(tree)
    assert len(chain(5, [])) == 1


# --- select_nodes


def test_select_nodes_takes_best_scores_and_returns_them_ascending():
    scores = np.array([-1.0, -1.0, -0.5, -2.0, -1.0])
    np.testing.assert_array_equal(select_nodes(scores, 1), [2])
    np.testing.assert_array_equal(select_nodes(scores, 3), [0, 1, 2])  # ties -1.0: lower index first
    np.testing.assert_array_equal(select_nodes(scores, 4), [0, 1, 2, 4])
    np.testing.assert_array_equal(select_nodes(scores, 10), [0, 1, 2, 3, 4])
    assert select_nodes(scores, 0).size == 0


def test_select_nodes_never_lets_a_tied_child_displace_its_parent():
    # FLOWSPEC §10.4. Pool (root excluded, as build_tree calls it): A=0 child of root, B=1 child of A
    # with p = 1 so its score ties A's, C=2 child of root below both.
    scores = np.array([-1.0, -1.0, -1.5])
    np.testing.assert_array_equal(select_nodes(scores, 1), [0])
    np.testing.assert_array_equal(select_nodes(scores, 2), [0, 1])
    # A long chain of p = 1 children listed after an unrelated node with the same score.
    scores = np.array([-0.3, -0.3, -0.3, -0.3, -0.3])
    for budget in range(6):
        np.testing.assert_array_equal(select_nodes(scores, budget), np.arange(budget))


def random_pool(rng: np.random.Generator, n: int, tie_prob: float):
    """A pool built parents first (as build_tree builds it), with many exact score ties."""
    parents, scores = [-1], [0.0]
    for i in range(1, n):
        p = int(rng.integers(0, i))
        step = 0.0 if rng.random() < tie_prob else -float(rng.choice([0.5, 1.0, 1.5]))
        parents.append(p)
        scores.append(scores[p] + step)
    tokens = 1000 + np.arange(n)  # token - 1000 = pool index
    return tokens, np.asarray(parents), np.asarray(scores)


@pytest.mark.parametrize("seed", range(6))
def test_select_nodes_keeps_parents_on_random_pools_with_ties(seed):
    rng = np.random.default_rng(seed)
    tokens, parents, scores = random_pool(rng, 60, tie_prob=0.4)
    key = sorted(range(1, 60), key=lambda i: (-scores[i], i))
    for budget in range(0, 62, 3):
        picked = select_nodes(scores[1:], budget)
        assert np.all(np.diff(picked) > 0)
        chosen = np.concatenate(([0], 1 + picked))
        assert sorted(chosen[1:].tolist()) == sorted(key[:budget])
        chosen_set = set(chosen.tolist())
        for c in chosen[1:]:
            assert int(parents[c]) in chosen_set, f"budget {budget}: node {c} selected without its parent"


# --- layout

# Pool in level order: (token, parent, cumulative score). 4 ties its parent 2, 6 ties its parent 3.
POOL_TOKENS = np.array([100, 11, 12, 13, 14, 15, 16])
POOL_PARENTS = np.array([-1, 0, 0, 1, 2, 1, 3])
POOL_SCORES = np.array([0.0, -0.5, -1.0, -0.7, -1.0, -3.0, -0.7])


def test_layout_score_order_exact():
    tree = layout(POOL_TOKENS, POOL_PARENTS, POOL_SCORES, np.arange(7), "score")
    # score desc, pool index asc: 0, 1, 3, 6, 2, 4, 5
    np.testing.assert_array_equal(tree.tokens, [100, 11, 13, 16, 12, 14, 15])
    np.testing.assert_array_equal(tree.parents, [-1, 0, 1, 2, 0, 4, 1])
    np.testing.assert_array_equal(tree.depth, [0, 1, 2, 3, 1, 2, 2])
    np.testing.assert_array_equal(tree.scores, [0.0, -0.5, -0.7, -0.7, -1.0, -1.0, -3.0])
    assert_well_formed(tree)


def test_layout_level_order_exact():
    tree = layout(POOL_TOKENS, POOL_PARENTS, POOL_SCORES, np.array([5, 0, 3, 1, 2, 6, 4]), "level")
    np.testing.assert_array_equal(tree.tokens, POOL_TOKENS)
    np.testing.assert_array_equal(tree.parents, POOL_PARENTS)
    np.testing.assert_array_equal(tree.depth, [0, 1, 1, 2, 2, 2, 3])
    assert_well_formed(tree)


def test_layout_of_a_subset_remaps_parents():
    tree = layout(POOL_TOKENS, POOL_PARENTS, POOL_SCORES, np.array([0, 1, 2, 3, 6]), "score")
    np.testing.assert_array_equal(tree.tokens, [100, 11, 13, 16, 12])
    np.testing.assert_array_equal(tree.parents, [-1, 0, 1, 2, 0])
    tree = layout(POOL_TOKENS, POOL_PARENTS, POOL_SCORES, np.array([0, 2, 4]), "level")
    np.testing.assert_array_equal(tree.tokens, [100, 12, 14])
    np.testing.assert_array_equal(tree.parents, [-1, 0, 1])


def test_layout_requires_the_root():
    with pytest.raises(ValueError):
        layout(POOL_TOKENS, POOL_PARENTS, POOL_SCORES, np.array([1, 3]), "level")
    with pytest.raises(ValueError):
        layout(POOL_TOKENS, POOL_PARENTS, POOL_SCORES, np.array([1, 3]), "score")


@pytest.mark.parametrize("seed", range(6))
def test_layout_orders_are_topological_and_score_order_is_sorted(seed):
    rng = np.random.default_rng(100 + seed)
    tokens, parents, scores = random_pool(rng, 50, tie_prob=0.4)
    budget = int(rng.integers(1, 49))
    chosen = np.concatenate(([0], 1 + select_nodes(scores[1:], budget)))
    by_score = layout(tokens, parents, scores, chosen, "score")
    by_level = layout(tokens, parents, scores, chosen, "level")
    for tree in (by_score, by_level):
        assert_well_formed(tree)
        assert len(tree) == budget + 1
        pool_idx = tree.tokens - 1000
        assert pool_idx[0] == 0
        # each node's parent is its pool parent
        np.testing.assert_array_equal(pool_idx[tree.parents[1:]], parents[pool_idx[1:]])
        np.testing.assert_array_equal(tree.scores, scores[pool_idx])
        assert sorted(pool_idx.tolist()) == sorted(chosen.tolist())
    assert np.all(np.diff(by_level.tokens) > 0)
    keys = list(zip(-by_score.scores, by_score.tokens - 1000))
    assert all(a < b for a, b in zip(keys, keys[1:])), "score order must be (score desc, pool index asc)"


# --- build_tree with a deterministic fake drafter

V = 12


def path_logprobs(path: tuple[int, ...]) -> np.ndarray:
    """The fake drafter's log-probs after a token path: seeded by the whole path, distinct values."""
    logits = np.random.default_rng([7, *path]).normal(size=V) * 2.0
    return logits - np.log(np.exp(logits).sum())


class FakeStep:
    """A step() that rebuilds each row's token path from parent_rows and records every call."""

    def __init__(self, root_path: tuple[int, ...], topk: int, logprobs=path_logprobs) -> None:
        self.root_path, self.topk, self.logprobs = root_path, topk, logprobs
        self.row_paths: list[tuple[int, ...]] = []
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, tokens: np.ndarray, parent_rows: np.ndarray) -> np.ndarray:
        assert tokens.shape == parent_rows.shape and tokens.ndim == 1
        first_row = len(self.row_paths)
        if not self.calls:
            assert np.all(parent_rows == -1), "the first frontier hangs off the root"
        else:
            prev_start = first_row - len(self.calls[-1][0])
            assert np.all((parent_rows >= prev_start) & (parent_rows < first_row)), \
                "a frontier's parents are the previous call's rows"
        out = []
        for tok, pr in zip(tokens.tolist(), parent_rows.tolist()):
            parent_path = self.root_path if pr < 0 else self.row_paths[pr]
            top = [t for t, _ in _topk(self.logprobs(parent_path), self.topk)]
            assert tok in top, f"row {pr} did not propose token {tok}"
            self.row_paths.append(parent_path + (tok,))
            out.append(self.logprobs(self.row_paths[-1]))
        self.calls.append((tokens.copy(), parent_rows.copy()))
        return np.stack(out)  # [k, V]


def reference_paths(root: int, topk: int, depth: int, budget: int, logprobs=path_logprobs) -> set[tuple[int, ...]]:
    """Brute-force EAGLE-2 selection (scores here have no ties, so tie-breaks do not matter)."""
    def top(path):
        lp = logprobs(path)
        return [(t, float(lp[t])) for t in np.argsort(-lp)[:topk]]

    pool = [(s, (root, int(t))) for t, s in top((root,))]
    frontier = pool
    for _ in range(depth - 1):
        cands = [(s + lp, path + (int(t),)) for s, path in frontier for t, lp in top(path)]
        pool += cands
        frontier = sorted(cands, key=lambda c: -c[0])[:topk]
    return {(root,)} | {path for _, path in sorted(pool, key=lambda c: -c[0])[:budget]}


@pytest.mark.parametrize(
    "topk, depth, budget",
    [(3, 4, 20), (3, 4, 30), (2, 5, 9), (4, 2, 10), (3, 1, 2), (3, 3, 0)],
)
@pytest.mark.parametrize("order", ["score", "level"])
def test_build_tree_matches_reference_eagle2_selection(topk, depth, budget, order):
    root = 4
    step = FakeStep((root,), topk)
    tree = build_tree(root, path_logprobs((root,)), step, topk=topk, depth=depth, budget=budget, order=order)
    assert_well_formed(tree)
    pool_size = topk + (depth - 1) * topk * topk
    assert len(tree) == min(budget, pool_size) + 1
    assert int(tree.depth.max()) <= depth
    assert len(step.calls) == depth - 1
    assert all(len(toks) == topk for toks, _ in step.calls)
    # the first frontier is the root's top-k in descending log-prob
    if step.calls:
        np.testing.assert_array_equal(step.calls[0][0], np.argsort(-path_logprobs((root,)))[:topk])
    paths = {token_path(tree, i) for i in range(len(tree))}
    assert paths == reference_paths(root, topk, depth, budget)
    # each node's score is the sum of the drafter's log-probs along its path
    for i in range(1, len(tree)):
        p = token_path(tree, i)
        expected = sum(path_logprobs(p[:j])[p[j]] for j in range(1, len(p)))
        assert tree.scores[i] == pytest.approx(expected, abs=1e-9)
    if order == "score":
        keys = list(zip(-tree.scores, range(len(tree))))
        assert all(a[0] <= b[0] for a, b in zip(keys, keys[1:]))


def test_build_tree_topk_above_vocab_is_clipped():
    root = 1
    step = FakeStep((root,), V)
    tree = build_tree(root, path_logprobs((root,)), step, topk=50, depth=2, budget=500)
    assert len(tree) == 1 + V + V * V
    assert_well_formed(tree)


def test_build_tree_with_p_one_children_keeps_every_parent():
    # Every node's child "token + 1" has p = 1 (log-prob 0), so it ties its parent's score (§10.4);
    # all the others are equally unlikely, so the top-k boundary is full of ties too.
    def peaky(path):
        lp = np.full(V, -30.0)
        lp[(path[-1] + 1) % V] = 0.0
        return lp

    for budget in range(0, 12):
        step = FakeStep((0,), 2, logprobs=peaky)
        tree = build_tree(0, peaky((0,)), step, topk=2, depth=4, budget=budget, order="score")
        assert_well_formed(tree)
        assert len(tree) == budget + 1
        # the p = 1 chain comes first, in order: 0 -> 1 -> 2 -> 3 -> 4
        chain_len = min(budget, 4)
        np.testing.assert_array_equal(tree.tokens[: chain_len + 1], np.arange(chain_len + 1))
        np.testing.assert_array_equal(tree.parents[1 : chain_len + 1], np.arange(chain_len))


def test_build_tree_breaks_topk_boundary_ties_by_lower_token_id():
    # token 5 is best, the other nine tie: the two extra children must be tokens 0 and 1.
    lp = np.log(np.full(10, 0.05))
    lp[5] = np.log(0.55)
    tree = build_tree(3, lp, lambda *_: pytest.fail("depth 1 needs no step"), topk=3, depth=1, budget=3)
    np.testing.assert_array_equal(tree.tokens, [3, 5, 0, 1])
    assert [t for t, _ in _topk(lp, 3)] == [5, 0, 1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lp = np.round(rng.normal(size=int(rng.integers(2, 30))))
        k = int(rng.integers(1, lp.size + 1))
        assert [t for t, _ in _topk(lp, k)] == np.lexsort((np.arange(lp.size), -lp))[:k].tolist()


# --- prune


def test_prune_to_a_subtree_reindexes_from_zero(tree_a):
    keep = tree_a.subtree(1)  # [1, 3, 4, 6]
    pruned = prune(tree_a, keep)
    np.testing.assert_array_equal(pruned.tokens, [11, 13, 14, 16])
    np.testing.assert_array_equal(pruned.parents, [-1, 0, 0, 1])
    np.testing.assert_array_equal(pruned.depth, [0, 1, 1, 2])
    np.testing.assert_array_equal(
        pruned.ancestors, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    )
    np.testing.assert_array_equal(pruned.ancestors, tree_a.ancestors[np.ix_(keep, keep)])
    np.testing.assert_allclose(pruned.scores, tree_a.scores[keep] - tree_a.scores[1])
    # positions are absolute: the new root sits where the old node 1 sat, one token later
    np.testing.assert_array_equal(pruned.positions(10 + 1), tree_a.positions(10)[keep])
    assert_well_formed(pruned)


def test_prune_keeping_the_root_drops_whole_branches(tree_a):
    pruned = prune(tree_a, [0, 2, 5])
    np.testing.assert_array_equal(pruned.tokens, [100, 12, 15])
    np.testing.assert_array_equal(pruned.parents, [-1, 0, 1])
    np.testing.assert_array_equal(pruned.depth, [0, 1, 2])
    np.testing.assert_array_equal(pruned.positions(7), tree_a.positions(7)[[0, 2, 5]])
    assert_well_formed(pruned)
    single = prune(tree_a, [6])
    assert len(single) == 1 and single.tokens[0] == 16 and single.parents[0] == -1 and single.depth[0] == 0


@pytest.mark.parametrize("keep", [[1, 6], [2, 3], [0, 3], [1, 3, 5], [0, 1, 6]])
def test_prune_rejects_a_keep_not_closed_under_parents(tree_a, keep):
    with pytest.raises(ValueError):
        prune(tree_a, keep)


@pytest.mark.parametrize("seed", range(4))
def test_prune_subtrees_of_random_trees_are_well_formed(seed):
    rng = np.random.default_rng(200 + seed)
    tree = random_tree(rng, 10, vocab=4)
    for node in range(len(tree)):
        keep = tree.subtree(node)
        pruned = prune(tree, keep)
        assert_well_formed(pruned)
        np.testing.assert_array_equal(pruned.ancestors, tree.ancestors[np.ix_(keep, keep)])
        np.testing.assert_array_equal(pruned.depth, tree.depth[keep] - tree.depth[node])
        assert {token_path(pruned, i) for i in range(len(pruned))} == {
            token_path(tree, int(i))[int(tree.depth[node]):] for i in keep
        }


# --- merge


def tree_b() -> TokenTree:
    """Shares root 100 and paths 11, 11-13, 11-13-16 with tree A; adds 17, 11-18, 17-19, 11-13-16-20."""
    return from_parents([100, 11, 17, 13, 18, 19, 16, 20], [-1, 0, 0, 1, 1, 2, 3, 6],
                        [0.0, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7])


def test_merge_appends_new_nodes_after_tree1_in_tree2_order(tree_a):
    merged, n_new = merge(tree_a, tree_b())
    assert n_new == 4
    np.testing.assert_array_equal(merged.tokens, A_TOKENS + [17, 18, 19, 20])
    np.testing.assert_array_equal(merged.parents, A_PARENTS + [0, 1, 7, 6])
    np.testing.assert_array_equal(merged.depth, A_DEPTH + [1, 2, 2, 4])
    np.testing.assert_array_equal(merged.path_to(10), [0, 1, 3, 6, 10])
    np.testing.assert_array_equal(merged.path_to(9), [0, 7, 9])
    np.testing.assert_allclose(merged.scores[7:], [-0.2, -0.4, -0.5, -0.7])
    # tree1's indices, masks and positions are untouched
    np.testing.assert_array_equal(merged.ancestors[:7, :7], A_ANCESTORS)
    assert not merged.ancestors[:7, 7:].any()
    np.testing.assert_array_equal(merged.positions(20)[:7], tree_a.positions(20))
    np.testing.assert_array_equal(merged.mask(2, 5), tree_a.mask(2, 5))
    assert_well_formed(merged)


def test_merge_with_nothing_new_returns_tree1(tree_a):
    merged, n_new = merge(tree_a, prune(tree_a, [0, 1, 3]))
    assert n_new == 0 and merged is tree_a
    merged, n_new = merge(tree_a, from_parents([100], [-1]))
    assert n_new == 0 and merged is tree_a


def test_merge_requires_the_same_root_token(tree_a):
    with pytest.raises(ValueError):
        merge(tree_a, from_parents([101, 11], [-1, 0]))


def test_merge_adds_tree2_scores_to_tree1_root_score():
    tree1 = from_parents([5, 6], [-1, 0], [-2.0, -2.5])
    merged, n_new = merge(tree1, from_parents([5, 7], [-1, 0], [0.0, -0.25]))
    assert n_new == 1
    np.testing.assert_allclose(merged.scores, [-2.0, -2.5, -2.25])


@pytest.mark.parametrize("seed", range(6))
def test_merge_random_trees_is_the_union_of_token_paths(seed):
    rng = np.random.default_rng(300 + seed)
    tree1 = random_tree(rng, int(rng.integers(1, 10)), vocab=3)
    tree2 = random_tree(rng, int(rng.integers(1, 10)), vocab=3)
    merged, n_new = merge(tree1, tree2)
    n1 = len(tree1)
    assert len(merged) == n1 + n_new
    assert_well_formed(merged)
    paths1 = [token_path(tree1, i) for i in range(n1)]
    paths2 = [token_path(tree2, j) for j in range(len(tree2))]
    merged_paths = [token_path(merged, i) for i in range(len(merged))]
    assert len(set(merged_paths)) == len(merged_paths), "duplicate token path"
    assert set(merged_paths) == set(paths1) | set(paths2)
    assert merged_paths[:n1] == paths1
    np.testing.assert_array_equal(merged.ancestors[:n1, :n1], tree1.ancestors)
    np.testing.assert_array_equal(merged.depth[:n1], tree1.depth)
    appended_in_tree2_order = [p for p in paths2 if p not in set(paths1)]
    assert merged_paths[n1:] == appended_in_tree2_order


# --- split_sizes


@pytest.mark.parametrize(
    "n, n_segments, max_size, expected",
    [
        (81, 5, None, [16, 16, 16, 16, 17]),
        (80, 5, 16, [16, 16, 16, 16, 16]),
        (81, 5, 16, [13, 13, 13, 14, 14, 14]),  # §10.1: one more segment rather than one too big
        (200, 5, 16, [15] * 8 + [16] * 5),
        (7, 3, None, [2, 2, 3]),
        (3, 5, None, [1, 1, 1]),
        (1, 5, 16, [1]),
        (0, 5, 16, []),
        (10, 1, 3, [2, 2, 3, 3]),
    ],
)
def test_split_sizes_exact(n, n_segments, max_size, expected):
    assert split_sizes(n, n_segments, max_size) == expected


def test_split_sizes_properties():
    for n in range(1, 120):
        for n_segments in range(1, 8):
            for max_size in (None, 1, 2, 5, 16, 40):
                sizes = split_sizes(n, n_segments, max_size)
                assert sum(sizes) == n
                assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
                assert sizes == sorted(sizes), "smaller segments first"
                wanted = n_segments if max_size is None else max(n_segments, -(-n // max_size))
                assert len(sizes) == min(wanted, n)
                if max_size is not None:
                    assert max(sizes) <= max_size


# --- cumulative depth (FLOWSPEC §5.1.3, §11.5): a property of the layout


@pytest.mark.parametrize("order", ["score", "level"])
@pytest.mark.parametrize("n_segments, max_size", [(5, None), (5, 4), (3, 16), (2, 1)])
def test_cumulative_depth_is_monotone_and_ends_at_path_length(order, n_segments, max_size):
    root = 2
    tree = build_tree(root, path_logprobs((root,)), FakeStep((root,), 3), topk=3, depth=4, budget=24, order=order)
    ends = np.cumsum(split_sizes(len(tree), n_segments, max_size))
    leaves = [i for i in range(len(tree)) if tree.children(i).size == 0]
    cum = np.zeros((ends.size, len(leaves)), dtype=np.int64)
    for col, leaf in enumerate(leaves):
        path = tree.path_to(leaf)
        for s, end in enumerate(ends):
            cum[s, col] = int(np.count_nonzero(path < end))
            # the nodes fed so far are a prefix of the path (indices increase along a path)
            assert np.all(path[: cum[s, col]] < end) and np.all(path[cum[s, col] :] >= end)
    assert np.all(cum[0] >= 1), "the root is in segment 0"
    assert np.all(np.diff(cum, axis=0) >= 0)
    np.testing.assert_array_equal(cum[-1], [tree.depth[leaf] + 1 for leaf in leaves])


# --- graft


def test_graft_raises_scores_of_nodes_it_shares_adds_the_rest_and_keeps_the_budget(tree_a):
    # 11, 13, 16 are in tree_a; 30 is new; a budget of 6 drafts drops the worst one (14, -2.0)
    by_score = graft(tree_a, [11, 13, 16, 30], [-0.2, -0.4, -0.6, -0.8], budget=6, order="score")
    np.testing.assert_array_equal(by_score.tokens, [100, 11, 13, 16, 30, 12, 15])
    np.testing.assert_array_equal(by_score.parents, [-1, 0, 1, 2, 3, 0, 5])
    np.testing.assert_allclose(by_score.scores, [0.0, -0.2, -0.4, -0.6, -0.8, -1.0, -1.5])
    by_level = graft(tree_a, [11, 13, 16, 30], [-0.2, -0.4, -0.6, -0.8], budget=6, order="level")
    np.testing.assert_array_equal(by_level.tokens, [100, 11, 12, 13, 15, 16, 30])
    np.testing.assert_array_equal(by_level.parents, [-1, 0, 0, 1, 2, 3, 5])
    np.testing.assert_array_equal(by_level.depth, [0, 1, 1, 2, 2, 3, 4])
    for tree in (by_score, by_level):
        assert_well_formed(tree)


def test_graft_keeps_a_better_score_the_tree_already_has(tree_a):
    tree = graft(tree_a, [11, 50], [-3.0, -3.5], budget=100, order="score")
    np.testing.assert_array_equal(tree.tokens, [100, 11, 13, 16, 12, 15, 14, 50])
    np.testing.assert_allclose(tree.scores[:2], [0.0, -0.5])
    assert tree.tokens[tree.parents[-1]] == 11 and tree.scores[-1] == -3.5


@pytest.mark.parametrize("seed", range(6))
def test_graft_random_is_the_best_of_the_union_of_token_paths(seed):
    rng = np.random.default_rng(500 + seed)
    tree = random_tree(rng, int(rng.integers(1, 12)), vocab=3)
    tree = from_parents(tree.tokens, tree.parents, -tree.depth.astype(float))  # scores fall down every path
    path = rng.integers(0, 3, int(rng.integers(1, 6))).tolist()
    path_scores = -0.7 * np.arange(1, len(path) + 1)
    budget = int(rng.integers(1, 16))
    paths = lambda t: {tuple(t.tokens[t.path_to(i)][1:].tolist()): float(t.scores[i]) for i in range(1, len(t))}
    union = paths(tree)
    for d in range(1, len(path) + 1):
        key = tuple(path[:d])
        union[key] = max(union.get(key, -np.inf), float(path_scores[d - 1]))
    for order in ("score", "level"):
        out = graft(tree, path, path_scores, budget, order)
        assert_well_formed(out)
        got = paths(out)
        assert len(got) == min(budget, len(union))
        assert all(union[k] == v for k, v in got.items())  # every kept node is a union node with its best score
        worst_kept = min(got.values(), default=np.inf)
        assert all(v <= worst_kept for k, v in union.items() if k not in got)
        if order == "score":
            assert np.all(np.diff(out.scores[1:]) <= 0)
        else:
            assert np.all(np.diff(out.depth) >= 0)
