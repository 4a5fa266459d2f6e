"""Sampling at temperature 1 through the whole engine reproduces the target's distribution (FLOWSPEC §11.11).

A 2-layer Llama with a 24-token vocabulary (LM head scaled so the distribution is neither flat nor
one-hot) generates 3 tokens per run over many seeds (`SamplingConfig.seed`), in-process, with
flowspec and chunk, the perfect drafter and a random EAGLE head. The first token is sampled at
prefill; the second and third come out of tree verification, sometimes from one acceptance,
sometimes from two. Their empirical distributions are compared with the target's exact softmax by
chi-square: the first token, the second token's marginal, and the second and third tokens given the
most frequent first token. Flowspec runs with 1- and 2-node segments
too, so a node's children span verified and unverified segments. Seeds are fixed, so the outcome is
deterministic; the critical values are at a 1e-3 level.

A negative control runs an engine whose acceptance forgets the residual (after rejecting every
draft it samples from the full distribution) and checks that the same statistics reject it.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

import engine.coordinator
from engine.config import SamplingConfig, SessionConfig, SpeculationConfig
from engine.coordinator import Coordinator
from engine.stage import load_head
from engine.verify import Accepted
from tests.integration.engine_kit import decisive_model, local_ring, make_drafter, prompt_ids, save_model
from tests.integration.engine_kit import single_thread  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

VOCAB = 24
N_RUNS = 800
Z_999 = 3.0902  # standard normal quantile at 1 - 1e-3

CONFIGS = {
    # name: (strategy, drafter, stages, speculation); the random head drafts 8 of the 24 tokens per
    # node, so that some of its drafts carry enough target probability to be accepted
    "flowspec-perfect-seg2": ("flowspec", "model", 2, dict(topk=4, depth=3, budget=10, segment_max=2)),
    "flowspec-head-seg1": ("flowspec", "head", 2, dict(topk=8, depth=2, budget=12, segment_max=1)),
    "chunk-perfect": ("chunk", "model", 2, dict(topk=4, depth=3, budget=10)),
    "chunk-head": ("chunk", "head", 2, dict(topk=8, depth=2, budget=12)),
}
# Acceptance outcomes each configuration must produce (counted over all its verifications):
# "verified child accepted": a draft accepted from a verified segment;
# "unverified child accepted": the accepted child sat in a segment not verified yet (the round goes on);
# "every child rejected": the bonus token came from the residual distribution.
OUTCOMES = {
    "flowspec-perfect-seg2": ("verified child accepted", "unverified child accepted", "every child rejected"),
    "flowspec-head-seg1": ("unverified child accepted", "every child rejected"),  # 1-node segments
    "chunk-perfect": ("verified child accepted", "every child rejected"),
    "chunk-head": ("verified child accepted", "every child rejected"),
}


def chi2_critical(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at 1 - 1e-3."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + Z_999 * math.sqrt(h)) ** 3


def chi2(counts: Counter, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of observed token counts against probabilities; bins with expected
    counts below 5 are pooled (and the pool joins the smallest bin if it is still below 5)."""
    n = sum(counts.values())
    observed = np.array([counts.get(t, 0) for t in range(len(probs))], dtype=np.float64)
    expected = n * probs.astype(np.float64)
    order = np.argsort(-expected)
    big = [i for i in order if expected[i] >= 5]
    small = [i for i in order if expected[i] < 5]
    obs, exp = [observed[i] for i in big], [expected[i] for i in big]
    if small:
        if expected[small].sum() >= 5:
            obs.append(observed[small].sum())
            exp.append(expected[small].sum())
        else:
            obs[-1] += observed[small].sum()
            exp[-1] += expected[small].sum()
    obs_a, exp_a = np.array(obs), np.array(exp)
    return float(((obs_a - exp_a) ** 2 / exp_a).sum()), len(exp_a) - 1


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = decisive_model("llama", scale=8.0, seed=1, vocab=VOCAB, hidden=32, n_layers=2, n_heads=4, n_kv_heads=2)
    directory = save_model(model, tmp_path_factory.mktemp("vocab24"))
    return model, directory, load_head(directory, "fp32")


@pytest.fixture(scope="module")
def prompt():
    return prompt_ids(6, VOCAB, seed=1)


def _softmax_next(model, sequences: list[list[int]]) -> np.ndarray:
    with torch.inference_mode():
        logits = model(torch.tensor(sequences)).logits[:, -1].double()
    return torch.softmax(logits, dim=-1).numpy()


def _sample(target, prompt, configuration: tuple, n_runs: int = N_RUNS, first_seed: int = 0) -> list[tuple[int, ...]]:
    _, directory, head = target
    strategy, drafter_kind, n_stages, spec = configuration
    ring, drafter = local_ring(directory, n_stages), make_drafter(drafter_kind, directory, head)
    out = []
    for seed in range(first_seed, first_seed + n_runs):
        config = SessionConfig(strategy=strategy, max_new_tokens=3, speculation=SpeculationConfig(**spec),
                               sampling=SamplingConfig(temperature=1.0, seed=seed))
        result = Coordinator(ring, head, drafter, config, set()).generate(prompt)
        out.append(tuple(result.token_ids))
    return out


def _statistics(model, prompt, runs: list[tuple[int, ...]]) -> dict[str, tuple[float, int, float]]:
    """name -> (statistic, degrees of freedom, critical value)."""
    assert all(len(r) == 3 for r in runs)
    p1 = _softmax_next(model, [prompt])[0]
    p2_all = _softmax_next(model, [prompt + [a] for a in range(VOCAB)])  # [a, b]: p(b | a)
    a = Counter(r[0] for r in runs).most_common(1)[0][0]
    p3_given_a = _softmax_next(model, [prompt + [a, b] for b in range(VOCAB)])  # [b, c]: p(c | a, b)
    given_a = [r for r in runs if r[0] == a]
    tests = {
        "first": (Counter(r[0] for r in runs), p1),
        "second (marginal)": (Counter(r[1] for r in runs), p1 @ p2_all),
        f"second | first = {a}": (Counter(r[1] for r in given_a), p2_all[a]),
        f"third | first = {a}": (Counter(r[2] for r in given_a), p2_all[a] @ p3_given_a),
    }
    out = {}
    for key, (counts, probs) in tests.items():
        stat, df = chi2(counts, probs)
        out[key] = (stat, df, chi2_critical(df) if df else math.nan)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampling_matches_the_target_distribution(name, target, prompt, monkeypatch):
    outcomes: Counter = Counter()
    accept = engine.coordinator.accept_stochastic

    def counting(tree, target_probs, generator):
        acc = accept(tree, target_probs, generator)
        outcomes["verified child accepted"] += acc.n_drafts > 0
        outcomes["unverified child accepted"] += acc.next_node is not None
        outcomes["every child rejected"] += acc.next_node is None and bool(tree.children(acc.path[-1]).size)
        return acc

    monkeypatch.setattr(engine.coordinator, "accept_stochastic", counting)
    runs = _sample(target, prompt, CONFIGS[name], first_seed=10_000 * list(CONFIGS).index(name))
    stats = _statistics(target[0], prompt, runs)
    report = "; ".join(f"{k}: chi2 {s:.1f} (df {df}, critical {c:.1f})" for k, (s, df, c) in stats.items())
    assert all(df >= 3 for _, df, _ in stats.values()), report  # enough bins for a meaningful test
    assert all(s < c for s, _, c in stats.values()), report
    assert all(outcomes[k] >= 30 for k in OUTCOMES[name]), outcomes


def _accept_forgetting_the_residual(tree, target_probs, generator):
    """engine.verify.accept_stochastic with a classic bug: after every child of a node is rejected,
    the bonus token is drawn from the full distribution instead of the residual."""
    m = int(target_probs.shape[0])
    node, path = 0, [0]
    while True:
        residual = target_probs[node].clone()
        chosen = None
        for child in tree.children(node):
            token = int(tree.tokens[child])
            p = float(residual[token]) / float(residual.sum())
            if float(torch.rand((), generator=generator)) < p:
                chosen = int(child)
                break
            residual[token] = 0.0
        if chosen is None:
            return Accepted(tuple(path), int(torch.multinomial(target_probs[node], 1, generator=generator)), None)
        if chosen >= m:
            return Accepted(tuple(path), int(tree.tokens[chosen]), chosen)
        path.append(chosen)
        node = chosen


def test_the_statistics_reject_a_biased_acceptance(target, prompt, monkeypatch):
    """Negative control: the test has the power to see a residual bug at this sample size."""
    monkeypatch.setattr(engine.coordinator, "accept_stochastic", _accept_forgetting_the_residual)
    # two drafts per node: every child rejected (where the bug acts) is common
    runs = _sample(target, prompt, ("chunk", "model", 2, dict(topk=2, depth=3, budget=6)), n_runs=400)
    stats = _statistics(target[0], prompt, runs)
    first = stats.pop("first")
    assert first[0] < first[2]  # the first token does not go through acceptance
    conditional = [v for k, v in stats.items() if "|" in k]
    assert len(conditional) == 2 and all(s > c for s, _, c in conditional), stats
