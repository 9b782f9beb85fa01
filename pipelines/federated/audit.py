"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, 2023).

``m`` canaries (rows given a wrong label) are each put into one client's training rows with
probability 1/2, independently; the others are held out. After the run, each canary is
scored by how much the model prefers its wrong label (:func:`canary_scores`). The auditor
guesses "included" for the ``k`` best-scored canaries. Under ``(ε, δ)``-DP the number of
right guesses is stochastically dominated by a Binomial(k, e^ε / (1 + e^ε)) plus a δ term
(their Theorem 3; :func:`audit_p_value`), so a count of right guesses that is unlikely under
``ε`` shows that the run is *not* ``ε``-DP: :func:`epsilon_lower_bound` is the largest such
``ε`` at 95 % confidence. A DP run's lower bound must stay at or below its claimed ``ε``; a
run without noise memorises its canaries and gets a bound above it.

The guesses are tried for a few fixed ``k`` (:data:`GUESS_COUNTS`, as shares of ``m``) with
a Bonferroni correction, so the bound stays valid although the best ``k`` is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GUESS_COUNTS = (0.05, 0.1, 0.2, 0.3, 0.5)  # shares of the canaries guessed "included"
CONFIDENCE = 0.95


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v right guesses out of r] for an ``(ε, δ)``-DP run with ``m`` canaries: the
    Binomial tail plus Steinke et al.'s ``2·m·δ·α`` term."""
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))
    alpha, tail = 0.0, 0.0
    if delta > 0:
        for i in range(1, v + 1):
            tail += float(binom.pmf(v - i, r, q))
            alpha = max(alpha, tail / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_for_guesses(
    m: int, r: int, v: int, delta: float, p_value: float = 1 - CONFIDENCE
) -> float:
    """The largest ``ε`` that ``v`` right guesses out of ``r`` refute at ``p_value``."""
    if r == 0 or audit_p_value(m, r, v, 0.0, delta) >= p_value:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(m, r, v, high, delta) < p_value:
        low, high = high, high * 2
        if high > 1e3:
            return high
    for _ in range(40):
        middle = (low + high) / 2
        if audit_p_value(m, r, v, middle, delta) < p_value:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class AuditResult:
    """What the audit found: the lower bound and the guesses behind it."""

    epsilon_lower_bound: float
    canaries: int
    guesses: int
    correct: int

    def flags(self, claimed_epsilon: float) -> bool:
        """Whether the audit refutes ``claimed_epsilon`` (the run leaks more than it says)."""
        return self.epsilon_lower_bound > claimed_epsilon


def epsilon_lower_bound(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = CONFIDENCE
) -> AuditResult:
    """The audit's ``ε`` lower bound from canary ``scores`` (higher = more likely included)
    and the truth ``included``: the best over :data:`GUESS_COUNTS`, Bonferroni-corrected."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    p_value = (1 - confidence) / len(GUESS_COUNTS)
    best = AuditResult(0.0, m, 0, 0)
    for share in GUESS_COUNTS:
        r = max(1, int(round(share * m)))
        v = int(included[order[:r]].sum())
        epsilon = epsilon_for_guesses(m, r, v, delta, p_value)
        if epsilon > best.epsilon_lower_bound:
            best = AuditResult(epsilon, m, r, v)
    return best


def make_canaries(
    images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, wrong labels, included)``: each row relabelled to a random other class
    and put in (``included`` true) with probability 1/2, independently."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, num_classes, size=len(labels))
    wrong = (np.asarray(labels, dtype=np.int64) + shift) % num_classes
    included = rng.random(len(labels)) < 0.5
    return np.asarray(images), wrong.astype(np.int64), included


def canary_scores(logits: np.ndarray, canary_labels: np.ndarray) -> np.ndarray:
    """How much the model prefers each canary's (wrong) label: its logit minus the largest
    other logit."""
    logits = np.asarray(logits, dtype=float)
    rows = np.arange(len(canary_labels))
    own = logits[rows, canary_labels]
    others = logits.copy()
    others[rows, canary_labels] = -np.inf
    return own - others.max(axis=1)


def run_canary_audit(
    encoder,
    clients: list,
    names: list[str],
    val,
    canary_source,
    p,
    seed: int,
    device: str = "cpu",
    audited_client: int = 0,
):
    """One record-level federation with canaries in client ``audited_client``; returns
    ``(model, history, AuditResult)``.

    ``canary_source`` (an :class:`~pipelines.io.ImageTable` of rows no client holds) gives
    the canaries' images; :func:`make_canaries` relabels them and picks the included half.
    The bound is computed at the run's ``federate.dp.delta``.
    """
    from pipelines.federated.record_federation import client_features, run_record_federation
    from pipelines.io import ImageTable, concat_tables

    images, wrong, included = make_canaries(
        canary_source.images, canary_source.labels, canary_source.num_classes, seed
    )
    audited = list(clients)
    planted = ImageTable(images[included], wrong[included], canary_source.num_classes)
    audited[audited_client] = concat_tables([clients[audited_client], planted])
    model, history, _ = run_record_federation(encoder, audited, names, val, p, seed, device)
    features, _ = client_features(
        model.encoder, ImageTable(images, wrong, canary_source.num_classes), device
    )
    head = model.head
    logits = (features.float() @ head.weight.detach().T + head.bias.detach()).numpy()
    result = epsilon_lower_bound(canary_scores(logits, wrong), included, p.dp.delta)
    return model, history, result
