"""Per-class and per-frequency accuracy: how a frozen backbone does on the classes that pretraining saw often,
sometimes and rarely.

The evaluation splits are balanced (see batchssl.data: only pretraining sees a long-tailed subset), so every
class is scored on the same number of images; what differs is how many images of it pretraining saw. As in the
long-tailed self-supervised literature (Jiang et al. 2021, Self-Damaging Contrastive Learning), the classes are
split into thirds by that pretraining frequency, many / medium / few, and each group reports the mean of its
classes' accuracies; the standard deviation of the per-class accuracies measures how even the representation is.

Groups: the classes sorted by pretraining count, descending, ties to the lower class index (so on balanced data,
and on the CIFAR-10-LT construction where the count falls with the label, the groups are label ranges), then cut
into three parts with numpy.array_split: when C is not a multiple of 3 the first groups take the extra class,
many before medium (C = 10: 4 / 3 / 3; C = 100: 34 / 33 / 33; C = 2: 1 / 1 / 0, the empty group reports None).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

GROUPS = ("many", "medium", "few")


def frequency_groups(class_counts: Sequence[int]) -> dict[str, list[int]]:
    """{"many": class indices, "medium": ..., "few": ...}: thirds of the classes by pretraining count (see the
    module docstring for ties and sizes)."""
    counts = np.asarray(class_counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")  # descending count; stable: equal counts keep the lower index first
    return {name: part.tolist() for name, part in zip(GROUPS, np.array_split(order, len(GROUPS)))}


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """Top-1 accuracy (percent) of every class c in [0, num_classes): correct predictions among the queries
    labelled c; None for a class without queries."""
    predictions = torch.as_tensor(predictions).reshape(-1).long().cpu()
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    total = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes)
    return [100.0 * c / n if n else None for c, n in zip(correct.tolist(), total.tolist())]


def per_class_report(
    predictions: Tensor, labels: Tensor, num_classes: int, class_counts: Sequence[int] | None = None
) -> dict:
    """Per-class accuracy and its summaries, all in percent.

    Returns {"per_class": [accuracy of class 0, 1, ...] (None: no query of that class), "class_std": population
    standard deviation (ddof 0) of the per-class accuracies, and with `class_counts` (images per class in the
    pretraining split, e.g. batchssl.data.pretrain_class_counts) "many", "medium", "few": the unweighted mean of
    the per-class accuracies in each third of the classes by that count (frequency_groups)}. Classes without
    queries are left out of the std and the means; a group without any scored class reports None.
    """
    per_class = per_class_accuracy(predictions, labels, num_classes)
    scored = [a for a in per_class if a is not None]
    report: dict = {"per_class": per_class, "class_std": float(np.std(scored)) if scored else None}
    if class_counts is not None:
        if len(class_counts) != num_classes:
            raise ValueError(f"{len(class_counts)} class counts for {num_classes} classes")
        for name, members in frequency_groups(class_counts).items():
            accs = [per_class[c] for c in members if per_class[c] is not None]
            report[name] = float(np.mean(accs)) if accs else None
    return report


def knn_frequency_metrics(
    features, settings, num_classes: int, class_counts: Sequence[int] | None, k: int | None = None
) -> dict:
    """The live monitor's kNN line with the per-frequency summaries, from one kNN search:
    {"knn_top1", "knn_top5", "knn_k", with class_counts "knn_many", "knn_medium", "knn_few", and
    "knn_class_std"}; knn_top1 / knn_top5 are exactly knn_evaluate's. `features`: batchssl.eval.knn.SplitFeatures;
    `settings`: KnnSettings; k defaults to settings.ks[0]. No per-class list: metrics.jsonl stays compact."""
    from batchssl.eval.knn import knn_evaluate_predictions

    k = settings.ks[0] if k is None else k
    scores, predictions = knn_evaluate_predictions(features, settings, num_classes, ks=(k,))
    report = per_class_report(predictions[k], features.query_labels, num_classes, class_counts)
    out = {"knn_top1": scores[k]["top1"], "knn_top5": scores[k]["top5"], "knn_k": k}
    out.update({f"knn_{name}": report[name] for name in GROUPS if name in report})
    out["knn_class_std"] = report["class_std"]
    return out
