"""engine.draft.LookupBranch: another drafter's tree with the prompt-lookup continuation grafted in.

The inner drafter here is a stub that returns a fixed tree, so the branch, its scores and the match
rates it learns from the target's tokens can be checked exactly; no model weights are involved.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.draft import LookupBranch
from engine.tree import from_parents


class FixedTree:
    """Always drafts root -> 7 (-0.1) -> 8 (-0.3), and root -> 9 (-2.0)."""

    name = "fixed"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.extended: list[list[int]] = []

    def extend(self, tokens, features) -> None:
        self.tokens.extend(int(t) for t in tokens)
        self.extended.append(list(tokens))

    def draft(self, *, topk, depth, budget, order):
        return from_parents([self.tokens[-1], 7, 8, 9], [-1, 0, 1, 0], [0.0, -0.1, -0.3, -2.0])


def paths(tree) -> dict[tuple[int, ...], float]:
    return {tuple(tree.tokens[tree.path_to(i)][1:].tolist()): round(float(tree.scores[i]), 6) for i in range(1, len(tree))}


@pytest.fixture
def branch() -> LookupBranch:
    drafter = LookupBranch(FixedTree(), length=4)
    # "1 2 3 4 5 6 ... 1 2" : the bigram (1, 2) was followed by 3 4 5 6
    drafter.extend([1, 2, 3, 4, 5, 6, 40, 41, 1, 2], None)
    return drafter


def test_the_branch_follows_the_longest_match_and_scores_by_the_prior_rate(branch):
    tree = branch.draft(topk=10, depth=5, budget=20, order="score")
    lp = np.log(0.5)  # no evidence yet: the prior, 1/2
    assert paths(tree) == {(7,): -0.1, (7, 8): -0.3, (9,): -2.0, (3,): round(lp, 6), (3, 4): round(2 * lp, 6),
                           (3, 4, 5): round(3 * lp, 6), (3, 4, 5, 6): round(4 * lp, 6)}
    assert np.all(np.diff(tree.scores[1:]) <= 0)
    assert branch.name == "fixed+lookup" and branch.tokens is branch.inner.tokens


def test_match_rates_are_learned_from_the_tokens_the_target_produced(branch):
    branch.draft(topk=10, depth=5, budget=20, order="score")  # proposes 3 4 5 6 from a bigram match
    branch.extend([3, 4, 99], None)  # two matched, then a miss
    assert branch.hits[2] == 2 and branch.misses[2] == 1
    assert branch.match_rate(2) == pytest.approx(3 / 5)
    assert branch.match_rate(3) == 0.5  # other n-gram lengths keep the prior
    assert branch.inner.extended[-1] == [3, 4, 99]  # the inner drafter sees every token too
    # a proposal that the target follows to its end counts hits only
    branch.extend([1, 2], None)
    branch.draft(topk=10, depth=5, budget=20, order="score")  # the bigram (1, 2) again: 3 4 99 1
    branch.extend([3], None)
    assert branch.hits[2] == 3 and branch.misses[2] == 1
    branch.reset()
    assert branch.hits.sum() == branch.misses.sum() == 0 and branch.tokens == []


def test_level_order_keeps_the_branch_within_the_tree_depth(branch):
    tree = branch.draft(topk=10, depth=2, budget=20, order="level")
    assert int(tree.depth.max()) == 2
    assert (3, 4) in paths(tree) and (3, 4, 5) not in paths(tree)
    assert np.all(np.diff(tree.depth) >= 0)


def test_the_budget_keeps_the_best_drafts_of_both(branch):
    tree = branch.draft(topk=10, depth=5, budget=3, order="score")
    assert set(paths(tree)) == {(7,), (7, 8), (3,)}


def test_no_match_leaves_the_inner_tree_alone():
    drafter = LookupBranch(FixedTree())
    drafter.extend([1, 2, 3], None)
    tree = drafter.draft(topk=10, depth=5, budget=20, order="score")
    assert paths(tree) == {(7,): -0.1, (7, 8): -0.3, (9,): -2.0}
    drafter.extend([4], None)
    assert drafter.hits.sum() == drafter.misses.sum() == 0
