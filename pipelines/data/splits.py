"""Pure, seeded functions that split rows: hold-out sets, a labeled share, client shards.

Every function takes labels and returns row indices (sorted ascending), so the caller picks
the rows from whichever table it holds. The same inputs and seed give the same indices.
"""

from __future__ import annotations

import logging

import numpy as np

from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

MAX_DIRICHLET_DRAWS = 100


def _stratified_split(
    index: np.ndarray, labels: np.ndarray, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``index`` into (rest, ``size`` rows), stratified by ``labels`` when possible."""
    from sklearn.model_selection import train_test_split

    try:
        rest, part = train_test_split(index, test_size=size, stratify=labels, random_state=seed)
    except ValueError as exc:  # a class too small to stratify: fall back to a plain split
        log.warning("stratified split impossible (%s); splitting without stratification", exc)
        rest, part = train_test_split(index, test_size=size, random_state=seed)
    return np.sort(rest), np.sort(part)


def split_holdout(
    labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified ``(train, val, test)`` row indices; fractions are of all rows."""
    labels = np.asarray(labels)
    n = len(labels)
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ConfigError(
            f"partition: {n} rows leave no training rows after {n_test} test and {n_val} val rows"
        )
    rest, test = _stratified_split(np.arange(n), labels, n_test, seed)
    train, val = _stratified_split(rest, labels[rest], n_val, seed)
    return train, val, test


def split_public(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(private, public)`` positions into ``labels``: ``fraction`` of the rows, stratified
    by label, declared public (``partition.public_fraction``); no client ever holds them."""
    labels = np.asarray(labels)
    n = len(labels)
    count = round(fraction * n)
    if fraction <= 0.0 or count < 1:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    if count >= n:
        raise ConfigError(
            f"partition.public_fraction {fraction}: the public split would take all {n} "
            "training rows and leave none for the clients"
        )
    return _stratified_split(np.arange(n), labels, count, seed + 1)


def select_labeled(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the ``fraction`` of rows whose labels are kept, stratified by label."""
    labels = np.asarray(labels)
    n = len(labels)
    if fraction >= 1.0:
        return np.arange(n)
    count = max(1, round(fraction * n))
    if count >= n:
        return np.arange(n)
    _, labeled = _stratified_split(np.arange(n), labels, count, seed)
    return labeled


def shard_clients(
    labels: np.ndarray,
    num_clients: int,
    skew: str,
    alpha: float,
    min_rows: int,
    seed: int,
) -> list[np.ndarray]:
    """Split rows into ``num_clients`` shards: ``iid`` or ``dirichlet`` label skew.

    Dirichlet: each class is divided among the clients in proportions drawn from
    Dirichlet(``alpha``); smaller alpha, more skew. Draws where a client gets fewer than
    ``min_rows`` rows are redrawn (up to 100 times), then repaired by moving random rows
    from the largest shards. Fewer than ``num_clients * min_rows`` rows is a ConfigError.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n < num_clients * min_rows:
        raise ConfigError(
            f"partition: {n} labeled rows cannot give {num_clients} clients "
            f"{min_rows} rows each; lower partition.num_clients or partition.min_client_rows, "
            "or raise partition.labeled_fraction"
        )
    rng = np.random.default_rng(seed)
    if skew == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(n), num_clients)]
    if skew != "dirichlet":
        raise ConfigError(f"partition.skew: unknown value '{skew}' (iid | dirichlet)")
    shards = _dirichlet_draw(labels, num_clients, alpha, rng)
    for _ in range(MAX_DIRICHLET_DRAWS - 1):
        if min(len(s) for s in shards) >= min_rows:
            break
        shards = _dirichlet_draw(labels, num_clients, alpha, rng)
    else:
        log.info("no Dirichlet draw gave every client %d rows; moving rows to repair", min_rows)
        shards = _repair(shards, min_rows, rng)
    return [np.sort(s) for s in shards]


def _dirichlet_draw(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for client, piece in enumerate(np.split(rows, cuts)):
            parts[client].append(piece)
    return [np.concatenate(p) for p in parts]


def _repair(shards: list[np.ndarray], min_rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    shards = [np.asarray(s) for s in shards]
    while True:
        sizes = np.array([len(s) for s in shards])
        poor = int(sizes.argmin())
        if sizes[poor] >= min_rows:
            return shards
        donor = int(sizes.argmax())
        give = min(min_rows - sizes[poor], sizes[donor] - min_rows)
        if give <= 0:  # cannot happen while n >= num_clients * min_rows
            raise ConfigError("partition: cannot give every client partition.min_client_rows rows")
        moved = rng.choice(len(shards[donor]), size=give, replace=False)
        keep = np.ones(len(shards[donor]), dtype=bool)
        keep[moved] = False
        shards[poor] = np.concatenate([shards[poor], shards[donor][moved]])
        shards[donor] = shards[donor][keep]


def label_histograms(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Label counts per client: ``(num_clients, num_classes)`` int64."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards]).astype(
        np.int64
    )


def label_skew(histograms: np.ndarray) -> float:
    """Mean total-variation distance between each client's and the overall label mix (0..1)."""
    histograms = np.asarray(histograms, dtype=np.float64)
    overall = histograms.sum(0) / histograms.sum()
    totals = histograms.sum(1, keepdims=True)
    mixes = np.divide(histograms, totals, out=np.zeros_like(histograms), where=totals > 0)
    return float(0.5 * np.abs(mixes - overall).sum(1).mean())
