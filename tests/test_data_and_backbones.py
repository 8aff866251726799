"""Splits, sampler, augmentation determinism, backbones and loading weights from torchvision."""

import random

import numpy as np
import pytest
import torch
import torchvision

from batchssl.augment import eval_transform, probe_train_transform, view_transforms
from batchssl.backbones import build_backbone
from batchssl.checkpoint import load_backbone
from batchssl.config import DataConfig, ModelConfig, load_config
from batchssl.data import EpochShardSampler, TwoViews, dataset_info, eval_datasets, pretrain_dataset


def test_holdout_comes_off_the_training_split_and_never_reaches_pretraining():
    cfg = DataConfig(name="fashion_mnist", holdout=1000)
    train, val = eval_datasets(cfg)
    pre = pretrain_dataset(cfg)
    assert len(train) == len(pre) == 59000 and len(val) == 1000
    full_train, _ = eval_datasets(DataConfig(name="fashion_mnist"))
    assert np.array_equal(np.asarray(val[0][0]), np.asarray(full_train[59000][0]))
    assert np.array_equal(np.asarray(pre[58999][0]), np.asarray(full_train[58999][0]))
    limited, limited_val = eval_datasets(DataConfig(name="fashion_mnist", limit=100, val_limit=10))
    assert len(limited) == 100 and len(limited_val) == 10 and len(full_train) == 60000


def test_sampler_shards_equal_one_process_batches():
    one = list(EpochShardSampler(100, global_batch=8, seed=3))
    two = [list(EpochShardSampler(100, global_batch=8, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(one) == 96 and all(len(t) == 48 for t in two)
    for b in range(12):  # global batch b = the union of both processes' local batch b
        assert sorted(one[8 * b : 8 * b + 8]) == sorted(two[0][4 * b : 4 * b + 4] + two[1][4 * b : 4 * b + 4])
    sampler = EpochShardSampler(100, global_batch=8, seed=3)
    sampler.set_epoch(1)
    assert [i for _, i in sampler] != [i for _, i in one] and all(e == 1 for e, _ in sampler)


def test_augmentation_depends_only_on_seed_epoch_index():
    cfg = load_config(None, ["data.limit=10"])
    info = dataset_info(cfg.data)
    views = TwoViews(pretrain_dataset(cfg.data), view_transforms(cfg, info), seed=0)
    torch.manual_seed(123)
    random.seed(5)
    state = torch.get_rng_state()
    a = views[(2, 7)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's generator is left alone
    torch.manual_seed(999)
    b = views[(2, 7)][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], views[(3, 7)][0][0])  # another epoch, another augmentation
    assert not torch.equal(a[0], a[1])  # two different views
    assert a[0].shape == (1, 28, 28)


def test_eval_transform_is_deterministic_and_normalised():
    info = dataset_info(DataConfig(name="fashion_mnist"))
    train, _ = eval_datasets(DataConfig(name="fashion_mnist", limit=2000))
    x = torch.stack([eval_transform(info)(train[i][0]) for i in range(2000)])
    assert x.shape == (2000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    torch.manual_seed(1)  # other generator states, a new transform: the very same tensors
    random.seed(1)
    assert torch.equal(torch.stack([eval_transform(info)(train[i][0]) for i in range(200)]), x[:200])


def test_probe_crop_below_64_px_shifts_and_flips_without_rescaling():
    info = dataset_info(DataConfig(name="fashion_mnist"))
    train, _ = eval_datasets(DataConfig(name="fashion_mnist", limit=1))
    image = train[0][0]
    padded = torch.nn.functional.pad(torch.from_numpy(np.array(image, dtype=np.float32) / 255), (3, 3, 3, 3))
    crops = [padded[dy : dy + 28, dx : dx + 28] for dy in range(7) for dx in range(7)]  # 28 // 8 = 3 px of padding
    transform = probe_train_transform(info)  # auto: the padded crop at 28 px
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        x = transform(image)[0] * info.std[0] + info.mean[0]
        hits = [
            (i, flip)
            for i, crop in enumerate(crops)
            for flip in (False, True)
            if torch.allclose(x, crop.flip(-1) if flip else crop, atol=1e-5)
        ]
        assert hits, "not a shifted (and maybe flipped) copy of the image at its own scale"
        seen.update(hits)
    assert len(seen) > 5  # it does move
    large = dataset_info(DataConfig(name="stl10"))
    assert isinstance(probe_train_transform(large).transforms[0], torchvision.transforms.RandomResizedCrop)
    assert isinstance(probe_train_transform(info, "resized").transforms[0], torchvision.transforms.RandomResizedCrop)
    with pytest.raises(ValueError, match="crop must be one of"):
        probe_train_transform(info, "centre")


@pytest.mark.parametrize("arch, size, dim", [("resnet18", 32, 512), ("resnet50", 64, 2048), ("vit_tiny", 32, 192)])
def test_backbones_give_one_feature_vector(arch, size, dim):
    net, feature_dim = build_backbone(ModelConfig(arch=arch), in_channels=3, image_size=size)
    assert feature_dim == dim
    assert net(torch.randn(2, 3, size, size)).shape == (2, dim)


def test_width_multiplier_and_grayscale_stem():
    net, dim = build_backbone(ModelConfig(arch="resnet18", width=0.25), in_channels=1, image_size=28)
    assert dim == 128 and net.conv1.in_channels == 1 and net.conv1.kernel_size == (3, 3)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 128)


@pytest.mark.parametrize("arch", ["resnet50", "vit_base"])
def test_torchvision_weights_load(arch, tmp_path):
    tv = getattr(torchvision.models, "resnet50" if arch == "resnet50" else "vit_b_16")()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    ours, _ = build_backbone(ModelConfig(arch=arch), in_channels=3, image_size=224)
    load_backbone(ours, path)
    tv.eval(), ours.eval()
    if arch == "resnet50":
        tv.fc = torch.nn.Identity()
    else:
        tv.heads = torch.nn.Identity()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)
