"""batchssl.eval.knn against a brute-force NumPy kNN, and on small cases whose answer is worked out by hand."""

import math

import numpy as np
import pytest
import torch

from batchssl.eval.knn import knn_classify, knn_predict_scores


def reference_scores(bank, bank_labels, queries, k, temperature, num_classes):
    """Full similarity matrix in float64, stable argsort, weighted vote; rows normalised to sum to 1."""
    bank = bank.numpy().astype(np.float64)
    queries = queries.numpy().astype(np.float64)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ bank.T
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
    scores = np.zeros((len(queries), num_classes))
    for row in range(len(queries)):
        np.add.at(scores[row], bank_labels.numpy()[nearest[row]], weights[row])
    return scores / scores.sum(axis=1, keepdims=True)


def reference_accuracy(scores, labels):
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, : min(5, scores.shape[1])]
    hits = ranked == labels.numpy()[:, None]
    return 100.0 * hits[:, 0].mean(), 100.0 * hits.any(axis=1).mean()


def random_problem(seed, n=400, m=90, dim=16, num_classes=7):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    bank_labels = torch.randint(0, num_classes, (n,), generator=g)
    query_labels = torch.randint(0, num_classes, (m,), generator=g)
    # Clustered but overlapping: the votes are neither unanimous nor random, so mistakes in them show.
    bank = centers[bank_labels] + 1.5 * torch.randn(n, dim, generator=g)
    queries = centers[query_labels] + 1.5 * torch.randn(m, dim, generator=g)
    return bank, bank_labels, queries, query_labels


@pytest.mark.parametrize(
    "k, temperature, batch_size",
    [
        (1, 0.07, 4096),
        (7, 0.07, 13),
        (20, 0.02, 1),
        (50, 0.5, 32),
        (200, 0.1, 90),
    ],
)
def test_matches_brute_force(k, temperature, batch_size):
    bank, bank_labels, queries, query_labels = random_problem(seed=k)
    expected = reference_scores(bank, bank_labels, queries, k, temperature, 7)

    scores = knn_predict_scores(
        bank, bank_labels, queries, k=k, temperature=temperature, num_classes=7, batch_size=batch_size
    )
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(scores.argmax(1), torch.from_numpy(expected.argmax(1)))

    result = knn_classify(
        bank, bank_labels, queries, query_labels, ks=(k,), temperature=temperature, num_classes=7, batch_size=batch_size
    )
    top1, top5 = reference_accuracy(expected, query_labels)
    assert result[k]["top1"] == pytest.approx(top1) and result[k]["top5"] == pytest.approx(top5)


@pytest.fixture
def three_threads_small_slices():
    """Three search threads and no BLAS threshold, so that even small batches are cut into three slices."""
    import faiss

    threads, threshold = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    faiss.omp_set_num_threads(3)
    faiss.cvar.distance_compute_blas_threshold = 0
    yield
    faiss.omp_set_num_threads(threads)
    faiss.cvar.distance_compute_blas_threshold = threshold


@pytest.mark.parametrize("batch_size", [2, 31, 4096])
def test_sliced_search_matches_brute_force(three_threads_small_slices, batch_size):
    import faiss

    bank, bank_labels, queries, _ = random_problem(seed=21)
    scores = knn_predict_scores(bank, bank_labels, queries, k=30, temperature=0.1, num_classes=7, batch_size=batch_size)
    expected = reference_scores(bank, bank_labels, queries, 30, 0.1, 7)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert faiss.omp_get_max_threads() == 3  # the pool threads' OpenMP setting did not leak into the caller's


def test_one_search_answers_every_k():
    bank, bank_labels, queries, query_labels = random_problem(seed=3)
    together = knn_classify(bank, bank_labels, queries, query_labels, ks=(5, 20, 100), batch_size=17)
    for k in (5, 20, 100):
        assert together[k] == knn_classify(bank, bank_labels, queries, query_labels, ks=(k,), batch_size=17)[k]
    assert len({together[k]["top1"] for k in together}) > 1  # the k really differ on this data


def test_strong_vote_beats_two_weak_ones_at_low_temperature():
    # Query on the x axis. Neighbour A (class 0) has similarity 1.0; B and C (class 1) have 0.9 each;
    # D (class 1) points the other way and is not among the 3 nearest.
    s = math.sqrt(1 - 0.9**2)
    bank = torch.tensor([[1.0, 0.0], [0.9, s], [0.9, -s], [-1.0, 0.0]])
    bank_labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    for temperature in (0.05, 1.0):
        # class 0 gets e^(1/T), class 1 gets 2 e^(0.9/T): ratio 2 e^(-0.1/T) = 0.271 at T=0.05, 1.81 at T=1.
        ratio = 2 * math.exp(-0.1 / temperature)
        scores = knn_predict_scores(bank, bank_labels, query, k=3, temperature=temperature)
        torch.testing.assert_close(scores, torch.tensor([[1 / (1 + ratio), ratio / (1 + ratio)]]))
    assert knn_classify(bank, bank_labels, query, torch.tensor([0]), ks=(3,), temperature=0.05)[3]["top1"] == 100
    assert knn_classify(bank, bank_labels, query, torch.tensor([0]), ks=(3,), temperature=1.0)[3]["top1"] == 0


def test_tied_class_scores_go_to_the_lower_class():
    # Two neighbours mirrored about the query: bitwise-equal similarities, equal votes for classes 1 and 0.
    bank = torch.tensor([[0.6, 0.8], [0.6, -0.8]])
    bank_labels = torch.tensor([1, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict_scores(bank, bank_labels, query, k=2).argmax(1).item() == 0
    assert knn_classify(bank, bank_labels, query, torch.tensor([0]), ks=(2,))[2] == {"top1": 100.0, "top5": 100.0}
    assert knn_classify(bank, bank_labels, query, torch.tensor([1]), ks=(2,))[2] == {"top1": 0.0, "top5": 100.0}


def test_k_larger_than_bank_and_few_classes():
    # 5 queries, k = 200, a bank of 50 and 3 classes: k is the whole bank, top-5 is top-3 (always right).
    bank, bank_labels, queries, query_labels = random_problem(seed=11, n=50, m=5, num_classes=3)
    result = knn_classify(bank, bank_labels, queries, query_labels, ks=(200,), temperature=0.07)
    expected = reference_scores(bank, bank_labels, queries, 50, 0.07, 3)
    assert result[200]["top1"] == pytest.approx(reference_accuracy(expected, query_labels)[0])
    assert result[200]["top5"] == 100.0
    scores = knn_predict_scores(bank, bank_labels, queries, k=200, temperature=0.07)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-6)


def test_normalisation_makes_the_vote_scale_invariant():
    bank, bank_labels, queries, _ = random_problem(seed=5)
    g = torch.Generator().manual_seed(0)
    scaled_bank = bank * torch.rand(len(bank), 1, generator=g).add(0.1) * 10
    torch.testing.assert_close(
        knn_predict_scores(scaled_bank, bank_labels, queries * 3, k=20),
        knn_predict_scores(bank, bank_labels, queries, k=20),
    )
    # Without normalisation the raw inner product ranks, and the long vectors win.
    assert not torch.allclose(
        knn_predict_scores(scaled_bank, bank_labels, queries, k=20, normalize=False),
        knn_predict_scores(bank, bank_labels, queries, k=20),
    )


def test_low_temperature_does_not_overflow():
    bank, bank_labels, queries, _ = random_problem(seed=6)
    scores = knn_predict_scores(bank, bank_labels, queries, k=50, temperature=1e-3)  # e^(1/T) is inf in float32
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(1), torch.ones(len(queries)))


def test_bad_inputs_are_clear_errors():
    bank, bank_labels, queries, query_labels = random_problem(seed=7)
    with pytest.raises(ValueError, match="bank labels"):
        knn_classify(bank, bank_labels[:-1], queries, query_labels)
    with pytest.raises(ValueError, match="query labels"):
        knn_classify(bank, bank_labels, queries, query_labels[:-1])
    with pytest.raises(ValueError, match="features must be"):
        knn_classify(bank, bank_labels, queries[:, :3], query_labels)
    with pytest.raises(ValueError, match="finite"):
        knn_classify(bank, bank_labels, torch.full_like(queries, float("nan")), query_labels)
    with pytest.raises(ValueError, match="lie in"):
        knn_classify(bank, bank_labels, queries, query_labels, num_classes=3)


def test_use_gpu_without_a_gpu_says_so(monkeypatch):
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)  # as with faiss-cpu, also on a machine with a GPU
    bank, bank_labels, queries, query_labels = random_problem(seed=8)
    with pytest.raises(RuntimeError, match="no GPU"):
        knn_classify(bank, bank_labels, queries, query_labels, use_gpu=True)
