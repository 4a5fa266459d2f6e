"""engine.stage_worker.prune_segment: re-indexing an in-flight segment into the index space after a Prune.

The oracle is the coordinator's own view: after `prune(tree, survivors)`, the segment a stage
holds must carry exactly the rows, positions and mask rows x columns that the coordinator would
send for the same nodes of the pruned tree (FLOWSPEC §5.5 b).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.stage_worker import prune_segment
from engine.tree import TokenTree, from_parents, prune
from engine.wire import Prune, Segment

PREFIX = 20

# Tree (10 nodes), level order:               0:50
#                                        1:1          2:2
#                                    3:3    4:4         5:5
#                                   6:6   7:7  8:8
#                                   9:9
TREE = from_parents([50, 1, 2, 3, 4, 5, 6, 7, 8, 9], [-1, 0, 0, 1, 1, 2, 3, 4, 4, 6])


def segment(tree: TokenTree, a: int, b: int, *, hidden: int | None = None, masked: bool = True, epoch: int = 0,
            prefix_len: int = PREFIX):
    """Segment [a, b) as the coordinator sends it; x is token ids, or fake hidden rows [T, hidden]."""
    seg = Segment(request_id=7, seg_id=3, epoch=epoch, prefix_len=prefix_len, start=a, masked=masked, busy_s=(0.5,))
    if hidden is None:
        x = torch.from_numpy(tree.tokens[a:b].copy())  # [T]
    else:
        x = torch.from_numpy(tree.tokens[a:b].copy()).float()[:, None] * torch.ones(hidden)  # [T, hidden]
    positions = torch.from_numpy(tree.positions(prefix_len, a, b).copy())  # [T]
    mask = torch.from_numpy(tree.mask(a, b).copy()) if masked else None  # [T, b] bool
    return seg, x, positions, mask


def accept_prune(tree: TokenTree, path: list[int], next_node: int | None, *, epoch: int = 1,
                 prefix_len: int = PREFIX) -> tuple[Prune, np.ndarray]:
    survivors = tree.subtree(next_node) if next_node is not None else np.zeros(0, dtype=np.int64)
    keep = tuple(int(k) for k in np.concatenate((path, survivors)))
    return Prune(request_id=7, epoch=epoch, prefix_len=prefix_len, n_accepted=len(path), keep=keep), survivors


def test_rows_mask_start_and_fields_after_a_continuing_prune():
    # accepted 0 -> 1, the bonus is node 4: survivors [4, 7, 8]
    msg, survivors = accept_prune(TREE, [0, 1], 4)
    np.testing.assert_array_equal(survivors, [4, 7, 8])
    seg, x, positions, mask = segment(TREE, 4, 8)  # nodes 4, 5, 6, 7
    new_seg, new_x, new_pos, new_mask = prune_segment(seg, x, positions, mask, msg)
    assert new_x.tolist() == [4, 7]  # rows 0 and 3
    assert new_pos.tolist() == [22, 23]  # absolute positions never change
    assert new_mask.tolist() == [[True, False], [True, True]]  # rows (4, 7) x columns (4, 7)
    assert new_mask.dtype == torch.bool
    assert new_seg.start == 0 and new_seg.epoch == 1 and new_seg.prefix_len == PREFIX + 2
    assert (new_seg.request_id, new_seg.seg_id, new_seg.masked, new_seg.busy_s) == (7, 3, True, (0.5,))
    # the stage's copy equals what the coordinator would send for the pruned tree
    pruned = prune(TREE, survivors)
    np.testing.assert_array_equal(new_mask.numpy(), pruned.mask(0, 2))
    np.testing.assert_array_equal(new_pos.numpy(), pruned.positions(PREFIX + 2, 0, 2))


def test_a_later_segment_starts_after_the_survivors_before_it():
    msg, _ = accept_prune(TREE, [0, 1], 4)
    seg, x, positions, mask = segment(TREE, 8, 10)  # nodes 8, 9
    new_seg, new_x, new_pos, new_mask = prune_segment(seg, x, positions, mask, msg)
    assert new_x.tolist() == [8]
    assert new_pos.tolist() == [23]  # node 8 is at depth 3
    assert new_mask.tolist() == [[True, False, True]]  # node 8 over columns (4, 7, 8)
    assert new_seg.start == 2


def test_hidden_rows_are_gathered_with_their_features():
    msg, _ = accept_prune(TREE, [0, 2], 5)  # survivors [5]
    seg, x, positions, mask = segment(TREE, 3, 7, hidden=4)
    new_seg, new_x, new_pos, new_mask = prune_segment(seg, x, positions, mask, msg)
    assert new_x.shape == (1, 4) and new_x.tolist() == [[5.0] * 4]
    assert new_pos.tolist() == [22]
    assert new_mask.tolist() == [[True]]
    assert new_seg.start == 0 and new_seg.prefix_len == PREFIX + 2


def test_unmasked_segment_keeps_no_mask():
    msg, _ = accept_prune(TREE, [0, 1], 3)  # survivors [3, 6, 9]
    seg, x, positions, _ = segment(TREE, 5, 10, masked=False)
    new_seg, new_x, new_pos, new_mask = prune_segment(seg, x, positions, None, msg)
    assert new_mask is None and new_seg.masked is False
    assert new_x.tolist() == [6, 9] and new_seg.start == 1


@pytest.mark.parametrize("a, b", [(0, 4), (5, 7), (2, 3)])
def test_none_when_no_node_of_the_segment_survives(a, b):
    msg, _ = accept_prune(TREE, [0, 1], 4)  # survivors [4, 7, 8]
    seg, x, positions, mask = segment(TREE, a, b)
    assert prune_segment(seg, x, positions, mask, msg) is None


@pytest.mark.parametrize("a, b", [(0, 4), (4, 8), (8, 10), (0, 10)])
def test_truncation_prune_leaves_no_survivors(a, b):
    # the bonus left the tree after 0 -> 1 -> 4: keep is the accepted path only
    msg, survivors = accept_prune(TREE, [0, 1, 4], None)
    assert survivors.size == 0 and msg.keep == (0, 1, 4) and msg.n_accepted == 3
    seg, x, positions, mask = segment(TREE, a, b)
    assert prune_segment(seg, x, positions, mask, msg) is None


def random_tree(rng: np.random.Generator, n: int) -> TokenTree:
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    return from_parents(list(range(100, 100 + n)), parents)  # token - 100 = node index


@pytest.mark.parametrize("seed", range(8))
def test_matches_the_pruned_tree_for_random_trees_and_segmentations(seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, 10)
    cuts = np.sort(rng.choice(np.arange(1, 10), size=int(rng.integers(1, 5)), replace=False))
    bounds = list(zip([0, *cuts], [*cuts, 10]))
    next_node = int(rng.integers(1, 10))
    path = tree.path_to(int(tree.parents[next_node])).tolist()
    msg, survivors = accept_prune(tree, path, next_node, epoch=4, prefix_len=PREFIX)
    pruned = prune(tree, survivors)
    for a, b in bounds:
        seg, x, positions, mask = segment(tree, a, b, epoch=3)
        out = prune_segment(seg, x, positions, mask, msg)
        expected_rows = survivors[(survivors >= a) & (survivors < b)]
        if expected_rows.size == 0:
            assert out is None
            continue
        new_seg, new_x, new_pos, new_mask = out
        start, end = int(np.searchsorted(survivors, a)), int(np.searchsorted(survivors, b))
        assert new_seg.start == start and new_seg.epoch == 4 and new_seg.prefix_len == PREFIX + len(path)
        np.testing.assert_array_equal(new_x.numpy(), pruned.tokens[start:end])
        np.testing.assert_array_equal(new_pos.numpy(), pruned.positions(PREFIX + len(path), start, end))
        np.testing.assert_array_equal(new_mask.numpy(), pruned.mask(start, end))


def test_two_prunes_in_a_row_match_pruning_the_tree_twice():
    # epoch 0 -> 1: accept 0, bonus node 1 (survivors = subtree(1) = [1, 3, 4, 6, 7, 8, 9])
    msg1, surv1 = accept_prune(TREE, [0], 1, epoch=1)
    tree1 = prune(TREE, surv1)  # tokens 1, 3, 4, 6, 7, 8, 9
    # epoch 1 -> 2: accept new 0 (token 1) -> new 2 (token 4), bonus token 8 (new index 5)
    msg2, surv2 = accept_prune(tree1, [0, 2], 5, epoch=2, prefix_len=PREFIX + 1)
    tree2 = prune(tree1, surv2)
    seg, x, positions, mask = segment(TREE, 6, 10)  # nodes 6..9, sent in epoch 0
    once = prune_segment(seg, x, positions, mask, msg1)
    assert once[0].start == 3 and once[1].tolist() == [6, 7, 8, 9]
    seg2, x2, pos2, mask2 = prune_segment(*once, msg2)
    assert seg2.epoch == 2 and seg2.prefix_len == PREFIX + 3 and seg2.start == 0
    assert x2.tolist() == [8] and pos2.tolist() == [23]
    np.testing.assert_array_equal(mask2.numpy(), tree2.mask(0, 1))
