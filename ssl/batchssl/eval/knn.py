"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO protocol) on FAISS.

Every query is compared with every bank entry by cosine similarity (exact inner-product search on
L2-normalised float32 features, `faiss.IndexFlatIP`). Each of the k nearest neighbours votes for its class
with weight exp(s / T); the class with the largest total weight wins.

Cost: one exhaustive search with kmax = max(ks) answers every k, because FAISS returns neighbours sorted by
similarity and the k nearest are the first k columns. Queries go through in batches, so memory is the bank
(one float32 copy inside the index) plus batch_size x kmax results; no queries x bank matrix is ever held.

Ties, so that results are deterministic and documented:
- equal class scores: the lower class index ranks first (stable sort on the scores);
- equal similarities at the k-th place (e.g. duplicate images in the bank): FAISS decides which neighbour is
  kept; it is the same on every run for the same data, batch size and thread count. The vote within the k
  neighbours does not depend on their order.

Threads: each query batch is cut into one contiguous slice per thread (faiss.omp_get_max_threads(), i.e. one
per core unless OMP_NUM_THREADS or faiss.omp_set_num_threads say otherwise), and every slice is searched by a
single-threaded FAISS call in its own Python thread (FAISS releases the GIL). FAISS' own OpenMP split
synchronises its threads twice per 1024-row bank block; the slices avoid those barriers, which matters most when
other processes compete for the cores (benchmarks/knn_speed.py measures it). Slices are never cut below FAISS'
BLAS threshold (see _search).
GPU: with a FAISS GPU build and a visible GPU (and use_gpu not False) the bank goes to a GpuIndexFlatIP and each
batch is one GPU search; FAISS' GPU k-selection stops at k = 2048, so a larger k searches on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from batchssl.errors import UserError
from batchssl.eval.features import extract_features


@dataclass(frozen=True)
class KnnSettings:
    ks: tuple[int, ...] = (20, 200)
    temperature: float = 0.07
    batch_size: int = 512  # feature extraction, per process
    num_workers: int = 0  # feature-extraction loader workers

    def check(self) -> None:
        """Raise UserError for settings that cannot work (before any feature is extracted)."""
        if not self.ks or min(self.ks) < 1:
            raise UserError(f"k must be >= 1, got {' '.join(map(str, self.ks))}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise UserError(f"temperature must be a positive number, got {self.temperature}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")


@dataclass
class SplitFeatures:
    """Frozen-backbone features of the kNN bank (labelled training split) and of the validation queries."""

    bank: Tensor
    bank_labels: Tensor
    queries: Tensor
    query_labels: Tensor


def split_features(
    backbone,
    bank: Dataset,
    queries: Dataset,
    settings: KnnSettings,
    accelerator=None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> SplitFeatures:
    """Features of both splits (every process gets them all; see extract_features)."""
    kwargs = dict(
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        accelerator=accelerator,
        dtype=dtype,
        progress=progress,
    )
    bank_x, bank_y = extract_features(backbone, bank, desc="kNN bank", **kwargs)
    val_x, val_y = extract_features(backbone, queries, desc="kNN queries", **kwargs)
    return SplitFeatures(bank_x, bank_y, val_x, val_y)


def knn_evaluate(features: SplitFeatures, settings: KnnSettings, num_classes: int) -> dict[int, dict[str, float]]:
    """The kNN score of a frozen backbone: what the training monitor and `python -m knn_eval` both report."""
    return knn_classify(
        features.bank,
        features.bank_labels,
        features.queries,
        features.query_labels,
        ks=settings.ks,
        temperature=settings.temperature,
        num_classes=num_classes,
    )


def knn_evaluate_predictions(
    features: SplitFeatures, settings: KnnSettings, num_classes: int, ks: Sequence[int] | None = None
) -> tuple[dict[int, dict[str, float]], dict[int, Tensor]]:
    """knn_evaluate's scores plus every query's top-1 prediction for each k, from the same single search:
    ({k: {"top1", "top5"}}, {k: int64 tensor (num_queries,)}). ks defaults to settings.ks."""
    return knn_classify_predictions(
        features.bank,
        features.bank_labels,
        features.queries,
        features.query_labels,
        ks=tuple(settings.ks if ks is None else ks),
        temperature=settings.temperature,
        num_classes=num_classes,
    )


# FAISS GPU selection kernels handle at most this many neighbours per query.
_GPU_MAX_K = 2048


def knn_classify(
    bank_feats: Tensor, bank_labels: Tensor, query_feats: Tensor, query_labels: Tensor, **options
) -> dict[int, dict[str, float]]:
    """Weighted kNN accuracy of `query_feats` against the labelled `bank_feats`, for every k in `ks`.

    Returns {k: {"top1": percent, "top5": percent}}. With fewer than 5 classes "top5" is top-C (100 %);
    a k larger than the bank uses the whole bank. `num_classes` defaults to 1 + the largest label seen.
    Options as knn_classify_predictions: ks, temperature, num_classes, batch_size, normalize, use_gpu.
    """
    return knn_classify_predictions(bank_feats, bank_labels, query_feats, query_labels, **options)[0]


def knn_classify_predictions(
    bank_feats: Tensor,
    bank_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 4096,
    normalize: bool = True,
    use_gpu: bool | None = None,
) -> tuple[dict[int, dict[str, float]], dict[int, Tensor]]:
    """knn_classify's result and, for every k, each query's top-1 class (int64, CPU), from one search.

    The prediction is the first class of the ranking that knn_classify scores (ties: lower class index), so
    (predictions[k] == query_labels).mean() is its top-1 exactly.
    """
    num_classes = _num_classes(num_classes, bank_labels, query_labels)
    query_labels = torch.as_tensor(query_labels).reshape(-1).long().cpu()
    if len(query_labels) != len(query_feats):
        raise ValueError(f"{len(query_feats)} query features but {len(query_labels)} query labels")
    top = min(5, num_classes)
    correct = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    predictions = {k: torch.empty(len(query_labels), dtype=torch.long) for k in ks}
    for rows, scores_by_k in _scores(
        bank_feats, bank_labels, query_feats, ks, temperature, num_classes, batch_size, normalize, use_gpu
    ):
        targets = query_labels[rows].unsqueeze(1)
        for k, scores in scores_by_k.items():
            ranked = _rank(scores)[:, :top]
            predictions[k][rows] = ranked[:, 0]
            hits = ranked == targets
            correct[k] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
    n = len(query_labels)
    scores = {k: {"top1": 100.0 * c[0].item() / n, "top5": 100.0 * c[1].item() / n} for k, c in correct.items()}
    return scores, predictions


def knn_predict_scores(
    bank_feats: Tensor,
    bank_labels: Tensor,
    query_feats: Tensor,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 4096,
    normalize: bool = True,
    use_gpu: bool | None = None,
) -> Tensor:
    """Class scores (num_queries, num_classes) of the weighted kNN vote, each row summing to 1.

    Row i is sum_j w_ij onehot(label_j) / sum_j w_ij over the k nearest neighbours j of query i, with
    w_ij = exp(s_ij / T). The prediction is `scores.argmax(1)` (ties: lower class index, as in knn_classify).
    """
    num_classes = _num_classes(num_classes, bank_labels)
    out = torch.empty(len(query_feats), num_classes)
    for rows, scores_by_k in _scores(
        bank_feats, bank_labels, query_feats, (k,), temperature, num_classes, batch_size, normalize, use_gpu
    ):
        out[rows] = scores_by_k[k]
    return out


def _scores(
    bank_feats, bank_labels, query_feats, ks, temperature, num_classes, batch_size, normalize, use_gpu
) -> Iterator[tuple[slice, dict[int, Tensor]]]:
    """Yield (query rows, {k: class scores of those rows}) batch by batch, from one search with max(ks)."""
    bank_labels = torch.as_tensor(bank_labels).reshape(-1).long().cpu()
    if bank_feats.ndim != 2 or query_feats.ndim != 2 or bank_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D); got {tuple(bank_feats.shape)} and {tuple(query_feats.shape)}"
        )
    if len(bank_feats) == 0 or len(query_feats) == 0:
        raise ValueError("the feature bank and the queries must not be empty")
    if len(bank_labels) != len(bank_feats):
        raise ValueError(f"{len(bank_feats)} bank features but {len(bank_labels)} bank labels")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes})")

    kmax = min(max(ks), len(bank_feats))
    index, on_gpu = _build_index(bank_feats, normalize, use_gpu, kmax, batch_size)
    threads = 1 if on_gpu else faiss.omp_get_max_threads()  # a GPU takes a whole batch in one call
    with ThreadPoolExecutor(threads) as pool:
        # Equal batches of at most batch_size (10000 queries: 3 x 3334, not 4096 + 4096 + 1808): a short last
        # batch would be cut into slices too small for FAISS' BLAS kernel (see _search).
        bounds = np.linspace(0, len(query_feats), -(-len(query_feats) // batch_size) + 1).astype(int)
        for start, end in zip(bounds[:-1], bounds[1:]):
            rows = slice(int(start), int(end))
            sims, idx = _search(index, _as_faiss_input(query_feats[rows], normalize), kmax, pool, threads)
            if (idx < 0).any():  # FAISS pads with -1 when it cannot rank a candidate, i.e. NaN features
                raise ValueError("kNN search returned no neighbour for some queries: are the features finite?")
            sims, neighbour_labels = torch.from_numpy(sims), bank_labels[torch.from_numpy(idx)]
            # exp((s - s_max) / T): the same vote up to a per-row factor, but exp cannot overflow at small T.
            weights = torch.exp((sims - sims[:, :1]) / temperature)
            yield rows, {k: _vote(weights[:, :k], neighbour_labels[:, :k], num_classes) for k in ks}


def _search(index, queries: np.ndarray, k: int, pool: ThreadPoolExecutor, threads: int):
    """(similarities, indices) of the k nearest, sorted, with the queries cut into up to `threads` slices.

    FAISS runs its BLAS kernel only when rows x dim >= faiss.cvar.distance_compute_blas_threshold (128000 in
    FAISS 1.15; older versions compared rows alone with 20); below it, a pair-by-pair loop about 3.5x slower
    per query. So no slice is cut smaller than that, and when fewer slices than threads result, each slice
    gets several OpenMP threads.
    """
    min_rows = max(1, -(-faiss.cvar.distance_compute_blas_threshold // queries.shape[1]))
    parts = max(1, min(threads, len(queries) // min_rows))
    if parts == 1:
        return index.search(queries, k)  # in the caller's thread, with its own OpenMP setting
    bounds = np.linspace(0, len(queries), parts + 1).astype(int)
    omp_threads = threads // parts
    sims, idx = zip(*pool.map(lambda a, b: _search_slice(index, queries[a:b], k, omp_threads), bounds[:-1], bounds[1:]))
    return np.concatenate(sims), np.concatenate(idx)


def _search_slice(index, queries: np.ndarray, k: int, omp_threads: int):
    faiss.omp_set_num_threads(omp_threads)  # per-thread OpenMP setting: this pool thread only, not the caller's
    return index.search(queries, k)


def _vote(weights: Tensor, neighbour_labels: Tensor, num_classes: int) -> Tensor:
    scores = torch.zeros(len(weights), num_classes).scatter_add_(1, neighbour_labels, weights)
    return scores / scores.sum(dim=1, keepdim=True)


def _rank(scores: Tensor) -> Tensor:
    """Class indices by decreasing score; stable, so equal scores keep the lower class index first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _build_index(bank_feats: Tensor, normalize: bool, use_gpu: bool | None, kmax: int, batch_size: int):
    """(index holding the bank, whether it is on the GPU)."""
    dim = bank_feats.shape[1]
    gpus = faiss.get_num_gpus()  # 0 with faiss-cpu
    if use_gpu and gpus == 0:
        raise RuntimeError("use_gpu=True but this FAISS build sees no GPU (faiss-cpu, or no CUDA device)")
    on_gpu = use_gpu is not False and gpus > 0 and kmax <= _GPU_MAX_K
    # GpuIndexFlatIP keeps a reference to its resources (faiss' add_ref_in_constructor), so the
    # StandardGpuResources object lives exactly as long as the index.
    index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), dim) if on_gpu else faiss.IndexFlatIP(dim)
    # Add in chunks so that normalising never copies the whole bank on top of the copy the index holds.
    for start in range(0, len(bank_feats), batch_size):
        index.add(_as_faiss_input(bank_feats[start : start + batch_size], normalize))
    return index, on_gpu


def _as_faiss_input(feats: Tensor, normalize: bool) -> np.ndarray:
    feats = feats.detach().to("cpu", torch.float32)
    if normalize:
        feats = F.normalize(feats, dim=1)
    return np.ascontiguousarray(feats.numpy())


def _num_classes(num_classes: int | None, *label_sets: Tensor) -> int:
    if num_classes is not None:
        return int(num_classes)
    return 1 + max(int(torch.as_tensor(labels).max()) for labels in label_sets)
