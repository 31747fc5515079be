"""Classification metrics over logits: accuracy, top-k, per-class scores, calibration.

Per-class precision, recall and F1 and the confusion matrix are scikit-learn's,
imported when first needed (it takes most of a second to import).
"""

from __future__ import annotations

import warnings

import numpy as np

TOP_K = 5
ECE_BINS = 15  # equal-width confidence bins


def classification_metrics(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Loss, accuracy, top-k accuracy, per-class scores, confusion matrix and calibration.

    Args:
        logits: ``[N, C]`` model outputs.
        labels: ``[N]`` true class indices.
        class_names: the ``C`` names, in label order.

    Returns:
        A JSON-ready dict: ``loss`` (mean cross-entropy, no label smoothing),
        ``accuracy``, ``top_k``, ``top_k_accuracy``, ``macro_precision``,
        ``macro_recall``, ``macro_f1``, ``per_class`` (name -> precision,
        recall, f1, support), ``confusion_matrix`` (rows true, columns
        predicted), ``ece`` and ``calibration`` (its bins).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape[1] != num_classes or len(labels) != len(logits):
        raise ValueError(
            f"need logits [N, {num_classes}] and labels [N], got {logits.shape} and {labels.shape}"
        )
    log_probs = logits - logsumexp(logits)
    probs = np.exp(log_probs)
    predicted = probs.argmax(1)
    k = min(TOP_K, num_classes)
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    cm = confusion_matrix(labels, predicted, num_classes)
    precision, recall, f1 = per_class_scores(labels, predicted, num_classes)
    ece, bins = expected_calibration_error(probs.max(1), predicted == labels)
    return {
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "accuracy": float(np.mean(predicted == labels)),
        "top_k": k,
        "top_k_accuracy": float(np.mean((top_k == labels[:, None]).any(1))),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "ece": ece,
        "calibration": bins,
    }


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` pairs into a ``[C, C]`` int64 matrix (rows true)."""
    from sklearn import metrics

    if len(labels) == 0:  # scikit-learn refuses empty input
        return np.zeros((num_classes, num_classes), np.int64)
    with warnings.catch_warnings():
        # scikit-learn warns of a 1x1 matrix in case labels were not passed; they are
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        cm = metrics.confusion_matrix(
            np.asarray(labels, np.int64),
            np.asarray(predicted, np.int64),
            labels=range(num_classes),
        )
    return cm.astype(np.int64)


def per_class_scores(
    labels: np.ndarray, predicted: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of each of the ``num_classes`` classes, as ``[C]`` float64.

    A score whose denominator is zero (a class never predicted, or absent) is 0.
    """
    from sklearn import metrics

    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        np.asarray(labels, np.int64),
        np.asarray(predicted, np.int64),
        labels=range(num_classes),
        zero_division=0,
    )
    return precision, recall, f1


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`` where bin
    ``b`` holds the predictions with confidence in ``(b / bins, (b + 1) / bins]``.

    Args:
        confidences: ``[N]`` probability of each predicted class.
        correct: ``[N]`` whether each prediction was right.
        bins: number of bins.

    Returns:
        ``(ece, [{"lower", "upper", "count", "accuracy", "confidence"}, ...])``;
        empty bins have accuracy and confidence None.
    """
    confidences = np.asarray(confidences, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # right=True puts a confidence equal to an upper edge in that bin; 0 joins the first
    index = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        confidence = float(confidences[members].mean()) if count else None
        if count:
            ece += count / len(confidences) * abs(accuracy - confidence)
        table.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": confidence,
            }
        )
    return float(ece), table


def logsumexp(x: np.ndarray) -> np.ndarray:
    """``log(sum(exp(x)))`` over each row of ``[N, C]``, as ``[N, 1]``, without overflow."""
    top = x.max(1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(1, keepdims=True))
