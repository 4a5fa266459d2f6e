"""engine.verify: greedy acceptance on hand-made trees, and stochastic acceptance checked against
closed-form rates and, statistically, against the target distribution (losslessness).

Terms follow engine/verify.py: verified nodes are the index prefix [0, M); the first committed
token is the first accepted draft if any, else the bonus token. Every statistical test uses a
fixed seed, so it is deterministic; the chi-square critical values are for alpha = 0.001.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.tree import TokenTree, chain, from_parents
from engine.verify import Accepted, accept_greedy, accept_stochastic, logits_to_probs

# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_CRIT_0001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                  8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123,
                  15: 37.697}

# Tree A (7 nodes):                      0:100
#                                   1:11         2:12
#                                3:13   4:14       5:15
#                               6:16
TREE_A = from_parents([100, 11, 12, 13, 14, 15, 16], [-1, 0, 0, 1, 1, 2, 3])


def committed(tree: TokenTree, acc: Accepted) -> list[int]:
    return [int(t) for t in tree.tokens[list(acc.path[1:])]] + [acc.bonus_token]


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic over the bins with p > 0 (bins with p == 0 must be empty) and its dof."""
    probs = np.asarray(probs, dtype=np.float64)
    assert counts[probs == 0].sum() == 0, f"outcomes with zero target probability: {counts[probs == 0]}"
    n = counts.sum()
    live = probs > 0
    expected = n * probs[live]
    return float(((counts[live] - expected) ** 2 / expected).sum()), int(live.sum()) - 1


def assert_matches(counts: np.ndarray, probs: np.ndarray) -> None:
    stat, dof = chi_square(counts, probs)
    assert stat < CHI2_CRIT_0001[dof], f"chi2 = {stat:.1f} >= {CHI2_CRIT_0001[dof]} (dof {dof}); counts {counts}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # np.testing, not torch.testing: the latter's first call costs about a second of imports
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.double().numpy(), expected.double().numpy(), rtol=1e-5, atol=1e-6)


def rows(*dists) -> torch.Tensor:
    return torch.tensor(dists, dtype=torch.float32)  # [M, V]


# --- greedy


def test_greedy_accepts_the_full_path_to_the_deepest_leaf():
    target = np.array([11, 13, 0, 16, 0, 0, 42])  # [M = 7] argmax after each node
    acc = accept_greedy(TREE_A, target)
    assert acc == Accepted((0, 1, 3, 6), 42, None)
    assert acc.n_drafts == 3
    assert committed(TREE_A, acc) == [11, 13, 16, 42]


def test_greedy_bonus_outside_the_tree_at_the_root():
    acc = accept_greedy(TREE_A, np.array([99, 13, 15, 16, 0, 0, 0]))
    assert acc == Accepted((0,), 99, None)
    assert acc.n_drafts == 0


def test_greedy_bonus_outside_the_tree_below_an_accepted_draft():
    acc = accept_greedy(TREE_A, np.array([12, 13, 77, 16, 0, 0, 0]))
    assert acc == Accepted((0, 2), 77, None)


def test_greedy_leaf_reached_mid_tree():
    # node 4 is a leaf at depth 2 while the tree is 3 deep
    acc = accept_greedy(TREE_A, np.array([11, 14, 0, 0, 7, 0, 0]))
    assert acc == Accepted((0, 1, 4), 7, None)
    # the bonus may repeat a token that exists elsewhere in the tree: it is not a child of the leaf
    acc = accept_greedy(TREE_A, np.array([11, 14, 0, 0, 16, 0, 0]))
    assert acc == Accepted((0, 1, 4), 16, None)


def test_greedy_bonus_is_an_unverified_child_so_the_round_continues():
    # M = 4: nodes 0..3 verified; node 1's children are 3 (verified) and 4 (not yet)
    acc = accept_greedy(TREE_A, np.array([11, 14, 15, 16]))
    assert acc == Accepted((0, 1), 14, 4)
    # same prefix, but the target picks the verified child: it is accepted and we go on
    acc = accept_greedy(TREE_A, np.array([11, 13, 15, 5]))
    assert acc == Accepted((0, 1, 3), 5, None)


@pytest.mark.parametrize(
    "target, expected",
    [
        ([12], Accepted((0,), 12, 2)),  # M = 1: only the root is verified
        ([11], Accepted((0,), 11, 1)),
        ([50], Accepted((0,), 50, None)),
        ([11, 13], Accepted((0, 1), 13, 3)),  # M = 2: the child of a verified node is unverified
        ([11, 99], Accepted((0, 1), 99, None)),
        ([12, 13, 15], Accepted((0, 2), 15, 5)),  # M = 3: node 2 verified, its child 5 is not
        ([11, 13, 15, 16, 14, 15], Accepted((0, 1, 3), 16, 6)),
    ],
)
def test_greedy_with_a_verified_prefix_shorter_than_the_tree(target, expected):
    # target has exactly M entries: reading past it would raise IndexError
    assert accept_greedy(TREE_A, np.array(target)) == expected


def test_greedy_on_a_chain_and_on_the_root_alone():
    tree = chain(5, [6, 7, 8])
    assert accept_greedy(tree, np.array([6, 7, 8, 9])) == Accepted((0, 1, 2, 3), 9, None)
    assert accept_greedy(tree, np.array([6, 7, 1, 9])) == Accepted((0, 1, 2), 1, None)
    assert accept_greedy(tree, np.array([6, 7])) == Accepted((0, 1), 7, 2)
    root = from_parents([5], [-1])
    assert accept_greedy(root, np.array([3])) == Accepted((0,), 3, None)


# --- stochastic: deterministic cases


def test_stochastic_one_hot_target_follows_the_tree_exactly():
    v = 20
    eye = torch.eye(v)
    # root -> 11 -> 13 -> 16, then the target says 2 after the leaf
    probs = torch.stack([eye[11], eye[13], eye[0], eye[16], eye[0], eye[0], eye[2]])  # [7, V]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert accept_stochastic(TREE_A, probs, g) == Accepted((0, 1, 3, 6), 2, None)


def test_stochastic_one_hot_on_an_unverified_child_continues():
    eye = torch.eye(20)
    g = torch.Generator().manual_seed(0)
    probs = torch.stack([eye[11], eye[14], eye[0], eye[0]])  # M = 4; node 4 (token 14) unverified
    for _ in range(20):
        assert accept_stochastic(TREE_A, probs, g) == Accepted((0, 1), 14, 4)
    probs = torch.stack([eye[12]])  # M = 1
    for _ in range(20):
        assert accept_stochastic(TREE_A, probs, g) == Accepted((0,), 12, 2)


def test_stochastic_never_accepts_a_child_with_zero_target_probability():
    # the target puts no mass on tokens 11 and 12, the root's children
    p = torch.zeros(20)
    p[[3, 4, 5]] = torch.tensor([0.2, 0.3, 0.5])
    probs = p.expand(7, 20).contiguous()
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        acc = accept_stochastic(TREE_A, probs, g)
        assert acc.path == (0,) and acc.next_node is None and acc.bonus_token in (3, 4, 5)


def test_stochastic_children_covering_all_mass_always_accept_one():
    tree = from_parents([9, 0, 1], [-1, 0, 0])
    probs = rows([0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0])
    g = torch.Generator().manual_seed(2)
    seen = set()
    for _ in range(200):
        acc = accept_stochastic(tree, probs, g)
        assert len(acc.path) == 2 and acc.bonus_token == 2
        seen.add(acc.path)
    assert seen == {(0, 1), (0, 2)}


def test_stochastic_does_not_modify_the_target_probs():
    probs = torch.full((7, 20), 1 / 20)
    before = probs.clone()
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        accept_stochastic(TREE_A, probs, g)
    assert torch.equal(probs, before)


def test_stochastic_is_reproducible_for_a_seeded_generator():
    probs = torch.softmax(torch.randn(7, 20, generator=torch.Generator().manual_seed(4)) * 0.3, -1)
    probs[:, [11, 12, 13, 14, 15, 16]] += 0.1
    probs /= probs.sum(-1, keepdim=True)

    def run(seed: int) -> list[Accepted]:
        g = torch.Generator().manual_seed(seed)
        return [accept_stochastic(TREE_A, probs, g) for _ in range(300)]

    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a != c
    assert len(set(a)) > 5  # the generator advances between calls


# --- stochastic: closed-form rates


def test_stochastic_closed_form_rates_for_two_children():
    # root's children A (token 0, node 1) then B (token 1, node 2); target p at the root
    p = [0.5, 0.3, 0.15, 0.05]
    tree = from_parents([3, 0, 1], [-1, 0, 0])
    probs = rows(p, [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25])
    g = torch.Generator().manual_seed(10)
    n = 5000
    results = [accept_stochastic(tree, probs, g) for _ in range(n)]
    got_a = sum(r.path == (0, 1) for r in results)
    got_b = sum(r.path == (0, 2) for r in results)
    got_none = [r.bonus_token for r in results if r.path == (0,)]
    assert got_a + got_b + len(got_none) == n
    assert all(r.next_node is None for r in results)

    def close(count: int, trials: int, prob: float) -> None:
        sd = np.sqrt(prob * (1 - prob) / trials)
        assert abs(count / trials - prob) < 4.5 * sd, f"{count}/{trials} vs {prob}"

    close(got_a, n, p[0])  # P(accept A) = p(A)
    close(got_b, n - got_a, p[1] / (1 - p[0]))  # P(accept B | A rejected) = p(B) / (1 - p(A))
    close(got_b, n, p[1])  # so P(accept B) = p(B)
    close(len(got_none), n, 1 - p[0] - p[1])  # both rejected
    # after both rejections the bonus comes from the residual: p restricted to {2, 3}
    assert set(got_none) <= {2, 3}
    close(got_none.count(2), len(got_none), p[2] / (p[2] + p[3]))
    # after A (a leaf) is accepted, the bonus comes from A's own row
    bonus_after_a = np.bincount([r.bonus_token for r in results if r.path == (0, 1)], minlength=4)
    assert_matches(bonus_after_a, probs[1].numpy())


# --- stochastic: losslessness of the first committed token

V = 6
P_ROOT = np.array([0.40, 0.30, 0.15, 0.08, 0.05, 0.02])


def first_token_counts(tree: TokenTree, probs: torch.Tensor, n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(probs.shape[1], dtype=np.int64)
    for _ in range(n):
        acc = accept_stochastic(tree, probs, g)
        counts[committed(tree, acc)[0]] += 1
    return counts


def _uniform_rows(m: int, root: np.ndarray) -> torch.Tensor:
    probs = torch.full((m, root.size), 1.0 / root.size)
    probs[0] = torch.from_numpy(root).float()
    return probs  # [M, V]


LOSSLESS_CASES = {
    # children in index order 1, 0, 2 cover 85% of the mass
    "children_cover_most_mass": (from_parents([9, 1, 0, 2], [-1, 0, 0, 0]), P_ROOT, 4),
    # children 5, 4 cover 7%
    "children_cover_little_mass": (from_parents([9, 5, 4], [-1, 0, 0]), P_ROOT, 3),
    # children 3 and 4 have zero target probability, 0 has half of it
    "zero_probability_children": (
        from_parents([9, 3, 0, 4], [-1, 0, 0, 0]), np.array([0.5, 0.3, 0.2, 0.0, 0.0, 0.0]), 4),
    # deeper tree, every node verified
    "deep_tree_all_verified": (
        from_parents([9, 0, 1, 2, 3, 1, 0], [-1, 0, 0, 1, 1, 2, 3]), P_ROOT, 7),
    # root's children 1 (verified), 3 and 5 (not): M = 2 < 6 nodes
    "children_split_across_verified_and_unverified": (
        from_parents([9, 2, 0, 1, 3, 4], [-1, 0, 1, 0, 3, 0]), P_ROOT, 2),
    "only_the_root_verified": (from_parents([9, 1, 0, 3], [-1, 0, 0, 1]), P_ROOT, 1),
}


@pytest.mark.parametrize("name", list(LOSSLESS_CASES))
def test_first_committed_token_is_distributed_as_the_target(name):
    tree, p_root, m = LOSSLESS_CASES[name]
    probs = _uniform_rows(m, p_root)
    counts = first_token_counts(tree, probs, 3000, seed=20)
    assert_matches(counts, p_root)


def test_split_case_continues_with_the_unverified_child():
    tree, p_root, m = LOSSLESS_CASES["children_split_across_verified_and_unverified"]
    probs = _uniform_rows(m, p_root)
    g = torch.Generator().manual_seed(21)
    outcomes = set()
    for _ in range(1000):
        acc = accept_stochastic(tree, probs, g)
        if acc.next_node is not None:
            assert acc.next_node >= m and tree.parents[acc.next_node] == acc.path[-1]
            assert acc.bonus_token == int(tree.tokens[acc.next_node])
        assert all(node < m for node in acc.path)
        outcomes.add((acc.path, acc.next_node))
    # the root's unverified children 3 and 5 are reached, and so is the verified child 1 (whose
    # own child 2 is unverified), and the bonus falls outside the tree too
    assert {((0,), 3), ((0,), 5), ((0, 1), 2), ((0,), None), ((0, 1), None)} == outcomes


def test_chi_square_check_detects_a_biased_acceptance_rule():
    """The statistic has power: the same check rejects acceptance without renormalising the residual."""
    tree, p_root, m = LOSSLESS_CASES["children_cover_most_mass"]
    g = torch.Generator().manual_seed(22)
    counts = np.zeros(V, dtype=np.int64)
    p = torch.from_numpy(p_root)
    for _ in range(1000):
        token = None
        residual = p.clone()
        for child in tree.children(0):
            tok = int(tree.tokens[child])
            if float(torch.rand((), generator=g)) < float(p[tok]):  # wrong: p(x), not p(x) / residual mass
                token = tok
                break
            residual[tok] = 0.0
        if token is None:
            token = int(torch.multinomial(residual, 1, generator=g))
        counts[token] += 1
    stat, dof = chi_square(counts, p_root)
    assert stat > CHI2_CRIT_0001[dof]


def test_first_two_committed_tokens_follow_the_target_chain_rule():
    # V = 4. Target: p1 at the root, p2[x1] after token x1 (two zeros so some pairs are impossible).
    p1 = np.array([0.4, 0.3, 0.2, 0.1])
    p2 = np.array([
        [0.1, 0.5, 0.4, 0.0],
        [0.25, 0.25, 0.25, 0.25],
        [0.3, 0.0, 0.2, 0.5],
        [0.7, 0.1, 0.1, 0.1],
    ])
    # depth-2 tree, all verified:  root -> 0 -> {1, 0};  root -> 2 -> {3}
    tree = from_parents([9, 0, 2, 1, 0, 3], [-1, 0, 0, 1, 1, 2])
    rows_ = [p1, p2[0], p2[2], np.full(4, 0.25), np.full(4, 0.25), np.full(4, 0.25)]
    probs = torch.tensor(np.stack(rows_), dtype=torch.float32)  # [6, V]
    g = torch.Generator().manual_seed(30)
    counts = np.zeros((4, 4), dtype=np.int64)
    for _ in range(4000):
        tokens = committed(tree, accept_stochastic(tree, probs, g))
        if len(tokens) == 1:  # bonus at the root: the next token is the target's own sample
            tokens.append(int(torch.multinomial(torch.from_numpy(p2[tokens[0]]), 1, generator=g)))
        counts[tokens[0], tokens[1]] += 1
    assert_matches(counts.ravel(), (p1[:, None] * p2).ravel())


# --- logits_to_probs


def test_logits_to_probs_at_temperature_one_is_softmax_in_float32():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    probs = logits_to_probs(logits, 1.0)
    assert probs.dtype == torch.float32 and probs.shape == (1, 4)
    assert_close(probs, torch.softmax(logits.float(), -1))
    half = logits_to_probs(logits.half(), 1.0)
    assert half.dtype == torch.float32
    assert_close(half.sum(-1), torch.ones(1))


def test_logits_to_probs_divides_by_temperature():
    logits = torch.tensor([1.0, 2.0, 0.5, -1.0])
    assert_close(logits_to_probs(logits, 0.5), torch.softmax(logits * 2, -1))
    assert_close(logits_to_probs(logits, 2.0), torch.softmax(logits / 2, -1))
    hot, cold = logits_to_probs(logits, 3.0), logits_to_probs(logits, 0.3)
    assert cold.max() > logits_to_probs(logits, 1.0).max() > hot.max()


@pytest.mark.parametrize("temperature", [0.0, 1e-9])
def test_logits_to_probs_near_zero_temperature_is_argmax(temperature):
    probs = logits_to_probs(torch.tensor([1.0, 2.0, 1.99, -1.0]), temperature)
    assert not torch.isnan(probs).any()
    assert int(probs.argmax()) == 1 and float(probs[1]) == pytest.approx(1.0)


def test_logits_to_probs_top_k_keeps_the_k_largest_and_renormalises():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.5], [0.0, -1.0, 4.0, 3.0, 1.0]])  # [2, V]
    probs = logits_to_probs(logits, 1.0, top_k=2)
    expected = torch.zeros(2, 5)
    expected[0, [1, 4]] = torch.softmax(torch.tensor([3.0, 2.5]), -1)
    expected[1, [2, 3]] = torch.softmax(torch.tensor([4.0, 3.0]), -1)
    assert_close(probs, expected)
    one = logits_to_probs(logits, 0.7, top_k=1)
    assert_close(one, torch.eye(5)[[1, 2]])


def test_logits_to_probs_top_k_at_or_above_vocab_is_a_no_op():
    logits = torch.tensor([1.0, 3.0, 2.0])
    for k in (3, 10, None):
        assert_close(logits_to_probs(logits, 1.3, top_k=k), torch.softmax(logits / 1.3, -1))


def test_logits_to_probs_top_k_keeps_every_entry_tied_with_the_kth():
    probs = logits_to_probs(torch.tensor([2.0, 1.0, 1.0, 0.0]), 1.0, top_k=2)
    assert (probs > 0).tolist() == [True, True, True, False]
