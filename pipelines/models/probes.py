"""Read-outs of a trained model: features, logits, and the kNN / linear probes of an encoder."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipelines.models.encoder import to_tensor


def _batched_outputs(
    module: nn.Module, images: np.ndarray, batch_size: int, device: str | torch.device
) -> np.ndarray:
    was_training = module.training
    module.eval()
    parameter = next(module.parameters(), None)
    original = parameter.device if parameter is not None else torch.device("cpu")
    module.to(device)
    x = to_tensor(images)
    try:
        with torch.inference_mode():
            starts = range(0, len(x), batch_size) if len(x) else [0]
            parts = [module(x[i : i + batch_size].to(device)).float().cpu().numpy() for i in starts]
    finally:
        module.to(original)
        module.train(was_training)
    return np.concatenate(parts)


def extract_features(
    encoder: nn.Module,
    images: np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Embeddings ``(n, d)`` float32 of images ``(n, c, h, w)`` (eval mode, no gradients).

    Pass ``classifier.encoder`` for a classifier's features. The module is left on its own
    device and in its own train / eval mode.
    """
    return _batched_outputs(encoder, images, batch_size, device)


def predict_logits(
    classifier: nn.Module,
    images: np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Logits ``(n, num_classes)`` float32 of images ``(n, c, h, w)`` (eval mode, no
    gradients)."""
    return _batched_outputs(classifier, images, batch_size, device)


def knn_accuracy(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    k: int = 10,
    chunk: int = 1024,
) -> float:
    """Accuracy of a cosine-similarity kNN classifier (majority of the ``k`` nearest training
    rows; a tie goes to the class with the larger summed similarity)."""
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("kNN needs at least one training and one test row")
    k = min(k, len(train_feats))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = _unit_rows(train_feats)
    correct = 0
    for start in range(0, len(test_feats), chunk):
        similarity = _unit_rows(test_feats[start : start + chunk]) @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        neighbour_labels = train_labels[nearest]
        neighbour_sims = np.take_along_axis(similarity, nearest, axis=1)
        rows = np.arange(len(nearest))[:, None]
        votes = np.zeros((len(nearest), num_classes))
        np.add.at(votes, (rows, neighbour_labels), 1.0)
        # summed similarities lie in (-k, k]; scaled below 1/2 they only break ties
        sims = np.zeros_like(votes)
        np.add.at(sims, (rows, neighbour_labels), neighbour_sims)
        predicted = (votes + sims / (2 * k + 2)).argmax(1)
        correct += int((predicted == test_labels[start : start + chunk]).sum())
    return correct / len(test_feats)


def linear_probe_accuracy(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    max_iter: int = 2000,
    seed: int = 0,
) -> float:
    """Accuracy of a logistic regression (scikit-learn, standardised features) trained on
    ``train_feats`` and scored on ``test_feats``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)
    )
    probe.fit(train_feats, train_labels)
    return float(probe.score(test_feats, test_labels))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
