"""Long-tailed pretraining (data.imbalance_ratio) and the per-frequency evaluation (many / medium / few)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from batchssl.config import DataConfig, ModelConfig, load_config, to_dict
from batchssl.data import (
    eval_datasets,
    in_memory_pretrain_images,
    long_tail_counts,
    long_tail_rows,
    pretrain_class_counts,
    pretrain_dataset,
)
from batchssl.errors import UserError
from batchssl.eval.knn import (
    KnnSettings,
    SplitFeatures,
    knn_classify,
    knn_classify_predictions,
    knn_evaluate,
    knn_evaluate_predictions,
)
from batchssl.eval.per_class import frequency_groups, knn_frequency_metrics, per_class_report
from helpers import REPO, main_in_process

# int(6000 * 100^(-c / 9)) for c = 0..9, by hand: 100^(-1/9) = 0.599484, so 6000, 3596.9, 2156.3, 1292.6, 774.6,
# 464.2, 278.3, 166.8, 100.0, 60.0, truncated as Cao et al.'s CIFAR-10-LT code does.
FMNIST_LT = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]


def _labels_of(ds) -> np.ndarray:
    return np.array([ds[i][1] for i in range(len(ds))])


# ---------------------------------------------------------------------------------------------- the subset


def test_long_tail_counts_are_the_literatures():
    assert long_tail_counts(6000, 10, 100) == FMNIST_LT and sum(FMNIST_LT) == 14886
    # CIFAR-10-LT and CIFAR-100-LT at ratio 100: the published 12,406 and 10,847 images.
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(long_tail_counts(500, 100, 100)) == 10847
    assert long_tail_counts(500, 100, 100)[:3] == [500, 477, 455] and long_tail_counts(500, 100, 100)[-1] == 5
    assert long_tail_counts(7, 4, 1.0) == [7, 7, 7, 7]
    assert long_tail_counts(10, 3, 1000)[-1] == 1  # never below one image


def test_long_tail_rows_keep_the_first_images_of_each_class_in_order():
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 0, 2])  # class 0 has 5 images: n_max = 5
    rows = long_tail_rows(labels, 3, ratio=4.0)  # keep int(5 * 4^(-c/2)): 5, 2, 1
    assert rows.tolist() == [0, 1, 2, 3, 5, 6, 9, 10]
    assert np.bincount(labels[rows]).tolist() == [5, 2, 1]
    assert long_tail_rows(labels, 3, 1.0).tolist() == list(range(12))


def test_fashion_mnist_lt_per_class_counts():
    cfg = DataConfig(name="fashion_mnist", imbalance_ratio=100)
    assert pretrain_class_counts(cfg) == FMNIST_LT
    images, labels = in_memory_pretrain_images(cfg)
    assert len(images) == len(pretrain_dataset(cfg)) == 14886
    assert np.bincount(labels).tolist() == FMNIST_LT
    # class c keeps its FIRST FMNIST_LT[c] images, in dataset order
    all_images, all_labels = in_memory_pretrain_images(DataConfig(name="fashion_mnist"))
    for c in (0, 4, 9):
        first = all_images[np.flatnonzero(all_labels == c)[: FMNIST_LT[c]]]
        assert np.array_equal(images[labels == c], first)
    assert pretrain_class_counts(DataConfig(name="fashion_mnist")) == [6000] * 10


def test_holdout_then_limit_then_long_tail():
    # holdout: n_max is measured after it (class 7 has 5045 of the first 50000), and nothing held out is kept
    cfg = DataConfig(name="fashion_mnist", imbalance_ratio=100, holdout=10000)
    counts = pretrain_class_counts(cfg)
    assert counts[1:] == long_tail_counts(5045, 10, 100)[1:] and counts[0] == 4977  # class 0 has only 4977
    images, labels = in_memory_pretrain_images(cfg)
    all_images, all_labels = in_memory_pretrain_images(DataConfig(name="fashion_mnist"))
    kept = long_tail_rows(all_labels[:50000], 10, 100)  # the cut of the first 50000: nothing of the last 10000
    assert np.array_equal(images, all_images[kept]) and np.array_equal(labels, all_labels[kept])
    # limit: the first N images, then the cut on them (n_max = 556: class 1 in the first 5000)
    counts = pretrain_class_counts(DataConfig(name="fashion_mnist", imbalance_ratio=100, limit=5000))
    assert counts[1:] == long_tail_counts(556, 10, 100)[1:] and counts[0] == 457


def test_pretrain_limit_cuts_pretraining_only():
    # the balanced twin: the first N pretraining images (after holdout and limit), the bank and the probes untouched
    cfg = DataConfig(name="fashion_mnist", holdout=10000, limit=30000, pretrain_limit=14886)
    images, labels = in_memory_pretrain_images(cfg)
    all_images, all_labels = in_memory_pretrain_images(DataConfig(name="fashion_mnist"))
    assert np.array_equal(images, all_images[:14886]) and np.array_equal(labels, all_labels[:14886])
    assert sum(pretrain_class_counts(cfg)) == len(pretrain_dataset(cfg)) == 14886
    train, val = eval_datasets(cfg)
    assert (len(train), len(val)) == (30000, 10000)
    # before the long-tailed cut, like limit: n_max is measured on the first 5000 (class 1 has 556 of them)
    counts = pretrain_class_counts(DataConfig(name="fashion_mnist", imbalance_ratio=100, pretrain_limit=5000))
    assert counts[1:] == long_tail_counts(556, 10, 100)[1:]


def test_balanced_evaluation_splits_are_untouched():
    for extra in ({}, {"holdout": 1000}, {"limit": 3000, "val_limit": 500}, {"pretrain_limit": 2000}):
        lt_train, lt_val = eval_datasets(DataConfig(name="fashion_mnist", imbalance_ratio=100, **extra))
        train, val = eval_datasets(DataConfig(name="fashion_mnist", **extra))
        assert (len(lt_train), len(lt_val)) == (len(train), len(val))
        for a, b in ((lt_train, train), (lt_val, val)):
            for i in np.linspace(0, len(a) - 1, 50).astype(int):
                assert np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0])) and a[i][1] == b[i][1]
    train, _ = eval_datasets(DataConfig(name="fashion_mnist", imbalance_ratio=100))
    assert len(train) == 60000


@pytest.mark.parametrize(
    "extra",
    [
        {"limit": 300},
        {"limit": 3000, "imbalance_ratio": 10.0},
        {"holdout": 59000, "imbalance_ratio": 100.0},
        {"holdout": 58000, "limit": 1500, "imbalance_ratio": 3.0},
        {"imbalance_ratio": 100.0},
    ],
)
def test_in_memory_images_equal_pretrain_dataset_item_by_item(extra):
    cfg = DataConfig(name="fashion_mnist", **extra)
    images, labels = in_memory_pretrain_images(cfg)
    ds = pretrain_dataset(cfg)
    assert images.dtype == np.uint8 and labels.dtype == np.int64 and images.shape[1:] == (28, 28)
    assert len(images) == len(labels) == len(ds) > 0
    for i in range(len(ds)):
        image, label = ds[i]
        assert label == labels[i] and np.array_equal(np.asarray(image), images[i])


def test_stl10_refuses_a_ratio_with_one_line():
    cfg = DataConfig(name="stl10", root="/nonexistent", imbalance_ratio=10)
    for fn in (pretrain_dataset, pretrain_class_counts, in_memory_pretrain_images):
        with pytest.raises(UserError, match="imbalance_ratio needs a labelled pretraining split"):
            fn(cfg)


def test_image_folder_long_tail(tmp_path):
    rng = np.random.default_rng(0)
    for c, n in enumerate([10, 8, 6]):
        folder = tmp_path / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), imbalance_ratio=4)
    assert pretrain_class_counts(cfg) == [10, 5, 2]  # int(10 * 4^(-c / 2))
    assert _labels_of(pretrain_dataset(cfg)).tolist() == [0] * 10 + [1] * 5 + [2] * 2
    assert in_memory_pretrain_images(cfg) is None


def test_lt_recipes_are_their_twins_plus_the_ratio():
    for path in sorted((REPO / "recipes").glob("**/*_lt.yaml")):
        lt = to_dict(load_config(path))
        twin = to_dict(load_config(path.with_name(path.stem.removesuffix("_lt") + ".yaml")))
        assert lt["data"]["imbalance_ratio"] == 100 and twin["data"]["imbalance_ratio"] == 1
        for d in (lt, twin):  # the schedule is rescaled to the twin's number of steps
            d.pop("output_dir"), d["data"].pop("imbalance_ratio"), d["train"].pop("epochs")
            d["optim"].pop("warmup_epochs"), d["checkpoint"].pop("every_n_epochs"), d["monitor"].pop("every_n_epochs")
            # the LT study ran on the papers' schedule ends; the 5-epoch Fashion-MNIST MoCo v3 twins moved to
            # constant ones after it (BENCHMARKS.md, round 4), so the LT recipes keep the ends they were measured with
            d["optim"].pop("final_lr_ratio"), d["method"].pop("momentum_final", None)
        assert lt == twin, path.name
        balanced = path.with_name(path.stem + "_balanced.yaml")
        if balanced.is_file():  # Fashion-MNIST: the balanced run of the LT split's size
            b, lt_cfg = load_config(balanced), load_config(path)
            assert b.data.imbalance_ratio == 1 and b.data.limit is None
            assert b.data.pretrain_limit == sum(pretrain_class_counts(lt_cfg.data))
            assert to_dict(b)["train"] == to_dict(lt_cfg)["train"]
        if path.stem.endswith("_bf_lt"):  # BatchFormer twins differ in BatchFormer only
            plain = to_dict(load_config(path.with_name(path.stem.replace("_bf_lt", "_lt") + ".yaml")))
            bf = to_dict(load_config(path))
            for d in (bf, plain):
                d.pop("output_dir"), d.pop("batchformer")
            assert bf == plain, path.name


def test_fashion_mnist_lt_recipes_match_their_twins_steps():
    for name in ("simsiam", "mocov3", "simsiam_bf", "mocov3_bf"):
        twin = load_config(REPO / "recipes" / "fashion_mnist" / f"{name}.yaml")
        lt = load_config(REPO / "recipes" / "fashion_mnist" / f"{name}_lt.yaml")
        twin_steps, lt_steps = twin.train.epochs * (60000 // 256), lt.train.epochs * (14886 // 256)
        assert abs(lt_steps - twin_steps) / twin_steps < 0.02
        assert abs(lt.optim.warmup_epochs * 58 - twin.optim.warmup_epochs * 234) <= 2


# ---------------------------------------------------------------------------------------------- the report


def test_groups_are_thirds_by_count_descending():
    assert frequency_groups([10, 500, 50, 5, 1000, 100]) == {"many": [4, 1], "medium": [5, 2], "few": [0, 3]}
    sizes = {c: [len(g) for g in frequency_groups([1] * c).values()] for c in (10, 100, 2)}
    assert sizes == {10: [4, 3, 3], 100: [34, 33, 33], 2: [1, 1, 0]}
    assert frequency_groups(FMNIST_LT) == {"many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    assert frequency_groups([5] * 6) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}  # ties: lower index


def test_group_means_by_hand():
    # 6 classes, 4 queries each; accuracies 50, 100, 25, 0, 75, 50 percent
    correct = [2, 4, 1, 0, 3, 2]
    labels, predictions = [], []
    for c, k in enumerate(correct):
        labels += [c] * 4
        predictions += [c] * k + [(c + 1) % 6] * (4 - k)
    counts = [10, 500, 50, 5, 1000, 100]  # many = {4, 1}, medium = {5, 2}, few = {0, 3}
    report = per_class_report(torch.tensor(predictions), torch.tensor(labels), 6, counts)
    assert report["per_class"] == [50.0, 100.0, 25.0, 0.0, 75.0, 50.0]
    assert report["many"] == pytest.approx((75 + 100) / 2)
    assert report["medium"] == pytest.approx((50 + 25) / 2)
    assert report["few"] == pytest.approx((50 + 0) / 2)
    # mean 50; squared deviations 0 + 2500 + 625 + 2500 + 625 + 0 = 6250 over 6 classes
    assert report["class_std"] == pytest.approx(math.sqrt(6250 / 6))
    assert set(per_class_report(torch.tensor(predictions), torch.tensor(labels), 6)) == {"per_class", "class_std"}


def test_a_class_without_queries_is_left_out():
    report = per_class_report(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 4, [40, 30, 20, 10])
    assert report["per_class"] == [50.0, 100.0, None, None]
    assert report["many"] == 75.0 and report["medium"] is None and report["few"] is None
    assert report["class_std"] == 25.0
    json.dumps(report)  # None, not NaN: the JSON files stay standard


def _clusters(n_per_class, num_classes, dim=16, seed=0, confuse=None):
    """Gaussian blobs around orthogonal centres; queries of class `confuse` sit on class 0's centre."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:num_classes] * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    where = labels.clone()
    if confuse is not None:
        where[labels == confuse] = 0
    return centres[where] + 0.3 * torch.randn(len(labels), dim, generator=g), labels


def test_knn_predictions_and_report_on_synthetic_features():
    bank, bank_y = _clusters(30, 4, seed=1)
    queries, query_y = _clusters(10, 4, seed=2, confuse=3)  # class 3's queries look like class 0
    scores, predictions = knn_classify_predictions(
        bank, bank_y, queries, query_y, ks=(5, 20), temperature=0.1, num_classes=4
    )
    assert scores == knn_classify(bank, bank_y, queries, query_y, ks=(5, 20), temperature=0.1, num_classes=4)
    for k in (5, 20):
        assert predictions[k].dtype == torch.long and len(predictions[k]) == 40
        assert 100.0 * (predictions[k] == query_y).double().mean().item() == pytest.approx(scores[k]["top1"])
    report = per_class_report(predictions[20], query_y, 4, class_counts=[300, 100, 30, 3])
    assert report["per_class"] == [100.0, 100.0, 100.0, 0.0]
    assert (report["many"], report["medium"], report["few"]) == (100.0, 100.0, 0.0)
    assert report["class_std"] == pytest.approx(math.sqrt(3 * 25.0**2 + 75.0**2) / 2)  # std of 100,100,100,0

    features = SplitFeatures(bank, bank_y, queries, query_y)
    settings = KnnSettings(ks=(20,), temperature=0.1)
    assert knn_evaluate_predictions(features, settings, 4)[0] == knn_evaluate(features, settings, 4)
    line = knn_frequency_metrics(features, settings, 4, [300, 100, 30, 3])
    assert line == {
        "knn_top1": 75.0,
        "knn_top5": 100.0,
        "knn_k": 20,
        "knn_many": 100.0,
        "knn_medium": 100.0,
        "knn_few": 0.0,
        "knn_class_std": report["class_std"],
    }
    assert set(knn_frequency_metrics(features, settings, 4, None)) == {"knn_top1", "knn_top5", "knn_k", "knn_class_std"}


def test_cached_probe_predictions_match_its_top1():
    from batchssl.eval.linear_cached import CachedProbeSettings, train_cached_probes

    x, y = _clusters(40, 3, seed=3)
    test_x, test_y = _clusters(20, 3, seed=4)
    settings = CachedProbeSettings(lrs=(0.1,), epochs=5, batch_size=32)
    plain = train_cached_probes(x[::2], y[::2], x[1::2], y[1::2], test_x, test_y, 3, settings)
    result = train_cached_probes(x[::2], y[::2], x[1::2], y[1::2], test_x, test_y, 3, settings, return_predictions=True)
    predictions = result.pop("test_predictions")
    assert result == plain and "test_predictions" not in plain
    assert 100.0 * (predictions == test_y).double().mean().item() == pytest.approx(result["test_top1"])


# ---------------------------------------------------------------------------------------------- the evaluator CLI


@pytest.mark.slow
def test_knn_and_linear_probe_clis_report_the_new_keys(tmp_path):
    from batchssl.backbones import build_backbone
    from batchssl.checkpoint import export_backbone

    torch.manual_seed(0)
    backbone, _ = build_backbone(ModelConfig(width=0.25), 1, 28)
    weights = tmp_path / "backbone.safetensors"
    export_backbone(backbone, weights)
    common = [
        "--backbone",
        str(weights),
        "--arch",
        "resnet18",
        "--dataset",
        "fashion_mnist",
        "model.width=0.25",
        "data.limit=600",
        "data.val_limit=300",
        "data.num_workers=0",
        "data.imbalance_ratio=10",
    ]
    from knn_eval.__main__ import main as knn_main
    from linear_probe.__main__ import main as probe_main

    main_in_process(knn_main, [*common, "--k", "20"])
    main_in_process(probe_main, [*common, "--epochs", "3"])
    counts = pretrain_class_counts(DataConfig(name="fashion_mnist", limit=600, imbalance_ratio=10))
    knn = json.loads((tmp_path / "knn.json").read_text())  # {"entries": {settings: record}, "latest": settings}
    entry = knn["entries"][knn["latest"]]["results"]["20"]
    probe = json.loads((tmp_path / "linear_probe.json").read_text())
    probe = probe["entries"][probe["latest"]]
    assert probe["mode"] == "cached"
    for record in (entry, probe):
        assert len(record["per_class"]) == 10 and {"many", "medium", "few", "class_std"} <= record.keys()
        groups = frequency_groups(counts)
        assert record["few"] == pytest.approx(np.mean([record["per_class"][c] for c in groups["few"]]))
    assert "test_predictions" not in probe and "test_labels" not in probe
