"""The split pipeline for image files (batchssl.filepipeline): loader workers decode and crop, the device does the
rest. Crops are torchvision's RandomResizedCrop (distribution and pixels), one process equals the rows of several,
workers equal the main process, and bad folders stop before training with one line."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy.stats import ks_2samp

from batchssl.config import load_config
from batchssl.data import dataset_info
from batchssl.errors import UserError
from batchssl.filepipeline import (
    SplitPipeline,
    StepCrops,
    build_split_pipeline,
    decode_on_device,
    image_folder_source,
)
from batchssl.views import view_specs
from benchmarks.make_photo_folder import build

SIZE = 32


def config(root, *overrides, recipe="recipes/imagenet/mocov3_r50.yaml"):
    return load_config(
        recipe, [f"data.root={root}", f"data.image_size={SIZE}", "train.batch_size=8", "data.num_workers=0", *overrides]
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16 + 4 JPEG photos at about 500x375 in 3 classes."""
    return build(tmp_path_factory.mktemp("photos"), train=16, val=4)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """The same kind of photos as PNG files of mixed sizes (lossless: PIL reads exactly what was written)."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_crop_boxes_follow_random_resized_crop_ks(photos):
    """The boxes cut for images of their own sizes have torchvision's area and aspect distributions."""
    cfg = config(photos)
    specs = view_specs(cfg, dataset_info(cfg.data))
    batch, steps = 64, 60
    crops = StepCrops(list(range(batch)), specs, cfg.seed, batch, torch.arange(batch))
    rng = np.random.default_rng(1)
    heights = torch.as_tensor(rng.integers(300, 600, batch))
    widths = torch.as_tensor(rng.integers(300, 600, batch))
    boxes = torch.cat([crops.boxes(0, step, heights, widths)[:, 0] for step in range(steps)])  # view 1
    area = (boxes[:, 2] * boxes[:, 3]).double() / (heights * widths).repeat(steps)
    aspect = (boxes[:, 3].double() / boxes[:, 2]).log()
    assert ((boxes[:, :2] >= 0) & (boxes[:, 0:1] + boxes[:, 2:3] <= heights.repeat(steps).view(-1, 1))).all()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = []
        for h, w in zip(heights.repeat(steps).tolist(), widths.repeat(steps).tolist()):
            _, _, rh, rw = T.RandomResizedCrop.get_params(
                torch.empty(1, h, w), list(specs[0].scale), list(specs[0].ratio)
            )
            ref.append((rh * rw / (h * w), np.log(rw / rh)))
    ref = np.asarray(ref)
    assert ks_2samp(area.numpy(), ref[:, 0]).pvalue > 1e-3
    assert ks_2samp(aspect.numpy(), ref[:, 1]).pvalue > 1e-3


def test_crops_are_torchvision_resized_crops(pngs):
    """Full-scale crops equal torchvision's functional resized_crop on PIL's RGB image with the same box."""
    cfg = config(pngs, "train.batch_size=4", "augment.local_crops=1")
    pipeline = build_split_pipeline(cfg, dataset_info(cfg.data), torch.device("cpu"))
    source, crops = pipeline.crops.source, pipeline.crops
    views, labels = crops[(1, 0)]
    rows = crops.rows(1, 0).tolist()
    images = [Image.open(source.paths[r]).convert("RGB") for r in rows]
    boxes = crops.boxes(1, 0, torch.tensor([im.height for im in images]), torch.tensor([im.width for im in images]))
    assert len(views) == len(crops.specs) == 3 and views[2].shape[1] < SIZE  # two global views, one local crop
    for i, image in enumerate(images):
        for v, spec in enumerate(crops.specs):
            expected = TF.resized_crop(
                image, *boxes[i, v].tolist(), [spec.size, spec.size], T.InterpolationMode.BILINEAR
            )
            np.testing.assert_array_equal(views[v][i].numpy(), np.asarray(expected))
    assert labels.tolist() == [int(source.labels[r]) for r in rows]


def test_one_process_equals_the_rows_of_two(photos):
    """The same step's views: world 1's rows r::2 are exactly world 2's rank r (crops and device views)."""
    cfg = config(photos)
    info = dataset_info(cfg.data)
    one = build_split_pipeline(cfg, info, torch.device("cpu"))
    two = [build_split_pipeline(cfg, info, torch.device("cpu"), rank=r, world=2) for r in range(2)]
    crops_one, labels_one = one.crops[(0, 1)]
    views_one = one.render(crops_one, 0, 1)
    for rank, pipeline in enumerate(two):
        crops, labels = pipeline.crops[(0, 1)]
        for c1, c2 in zip(crops_one, crops):
            assert torch.equal(c1[rank::2], c2)
        assert torch.equal(labels_one[rank::2], labels)
        for v1, v2 in zip(views_one, pipeline.render(crops, 0, 1)):
            torch.testing.assert_close(v1[rank::2], v2, rtol=0, atol=1e-5)


def test_loader_workers_deliver_the_main_process_batches_in_order(photos):
    """With 2 loader workers the epoch's batches equal those made in the main process (and a second pass, as
    after a resume, makes them again)."""
    cfg = config(photos)
    info = dataset_info(cfg.data)
    main = list(build_split_pipeline(cfg, info, torch.device("cpu")).batches(1))
    workers = build_split_pipeline(config(photos, "data.num_workers=2"), info, torch.device("cpu"))
    for _ in range(2):
        got = list(workers.batches(1))
        assert len(got) == len(main) == 2
        for (views_a, labels_a), (views_b, labels_b) in zip(main, got):
            assert torch.equal(labels_a, labels_b)
            for a, b in zip(views_a, views_b):  # CPU training: made in the workers (one thread), same ops
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.equal(main[0][0][0], main[1][0][0])


def test_views_are_normalised_and_augmented(photos):
    cfg = config(photos)
    pipeline = build_split_pipeline(cfg, dataset_info(cfg.data), torch.device("cpu"))
    views, labels = next(iter(pipeline.batches(0)))
    assert [tuple(v.shape) for v in views] == [(8, 3, SIZE, SIZE)] * 2 and labels.shape == (8,)
    assert all(v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last) for v in views)
    assert -1.5 < float(views[0].mean()) < 1.5 and not torch.equal(views[0], views[1])


def test_a_folder_of_empty_files_stops_before_training(tmp_path):
    for i in range(4):
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"every image file checked \(4\) is empty \(0 bytes\)"):
        image_folder_source(config(tmp_path))


def test_a_truncated_file_is_named(photos, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(photos, root)
    victim = sorted((root / "train").rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:2000])
    cfg = config(root)
    pipeline = build_split_pipeline(cfg, dataset_info(cfg.data), torch.device("cpu"))
    with pytest.raises(UserError, match=f"cannot read image {victim}"):
        for _ in pipeline.batches(0):
            pass


def test_pretrain_refuses_a_folder_of_empty_files_in_one_line(tmp_path):
    from helpers import run_entry

    for split in ("train", "val"):
        for i in range(4):
            folder = tmp_path / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(b"")
    result = run_entry(
        "pretrain.py",
        "--config",
        "recipes/imagenet/mocov3_r50.yaml",
        f"data.root={tmp_path}",
        "data.image_size=32",
        "train.batch_size=4",
        "model.arch=resnet18",
        "model.width=0.25",
        f"output_dir={tmp_path / 'run'}",
        check=False,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pretrain.py: error: ")]
    assert len(errors) == 1 and "is empty (0 bytes)" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_split_pipeline_is_for_files_only():
    cfg = load_config(None, ["data.pipeline=split"])
    with pytest.raises(UserError, match="data.pipeline=split reads image files; fashion_mnist is held in memory"):
        build_split_pipeline(cfg, dataset_info(cfg.data), torch.device("cpu"))


@pytest.fixture(scope="module")
def mixed(photos, tmp_path_factory):
    """The photos with one training file a CMYK JPEG and one a PNG: rows the device decode leaves to the workers."""
    import shutil

    root = tmp_path_factory.mktemp("mixed") / "photos"
    shutil.copytree(photos, root)
    files = sorted((root / "train").rglob("*.jpg"))
    Image.open(files[1]).convert("CMYK").save(files[1], "JPEG")  # still named .jpg
    Image.open(files[2]).save(files[2].with_suffix(".png"))
    files[2].unlink()
    return root


def device_decode_pipeline(cfg, rank: int = 0, world: int = 1) -> SplitPipeline:
    """data.decode gpu's pipeline with the device decode on the CPU (torchvision decodes there too); the builder
    refuses gpu without CUDA, so it is built directly."""
    return SplitPipeline(
        cfg, dataset_info(cfg.data), image_folder_source(cfg), torch.device("cpu"), rank, world, device_decode=True
    )


def test_device_decode_has_the_cpu_paths_boxes_and_close_pixels(mixed):
    """data.decode gpu: the same boxes from the same (seed, epoch, step) stream, the rows nvJPEG cannot take
    decoded by the worker exactly as on the CPU path, the others within test_decode's tolerance of it."""
    from batchssl.decode import image_size
    from test_decode import CROP_TOLERANCE

    cfg = config(mixed, "augment.local_crops=1")
    cpu = build_split_pipeline(cfg, dataset_info(cfg.data), torch.device("cpu"))
    gpu = device_decode_pipeline(cfg)
    left_to_workers = set()
    for epoch, step in [(0, 0), (0, 1), (1, 0)]:
        cpu_crops, cpu_labels = cpu.crops[(epoch, step)]
        worker_crops, labels, encoded = gpu.crops[(epoch, step)]
        assert torch.equal(labels, cpu_labels)
        files = [cpu.crops.source.read(r) for r in cpu.crops.rows(epoch, step).tolist()]
        sizes = torch.tensor([image_size(data, name) for data, name, _ in files])
        boxes = cpu.crops.boxes(epoch, step, sizes[:, 0], sizes[:, 1])
        assert torch.equal(encoded.boxes, boxes[encoded.rows])
        assert encoded.names == [files[i][1] for i in encoded.rows.tolist()]
        assert sorted(encoded.rows.tolist() + encoded.worker_rows.tolist()) == list(range(len(files)))
        left_to_workers |= {files[i][1] for i in encoded.worker_rows.tolist()}
        for v, worker_part in enumerate(worker_crops):
            assert torch.equal(worker_part, cpu_crops[v][encoded.worker_rows])
        merged = gpu._merge(worker_crops, encoded)
        for v, (a, b) in enumerate(zip(merged, cpu_crops)):
            assert a.shape == b.shape and a.dtype == torch.uint8
            per_crop = (a.double() - b.double()).abs().flatten(1).mean(1)
            assert per_crop.max() < CROP_TOLERANCE, (v, per_crop)
    # The CMYK JPEG and the PNG (each epoch sees every file once), and nothing else.
    assert len(left_to_workers) == 2 and any(name.endswith(".png") for name in left_to_workers)


def test_device_decode_one_process_equals_the_rows_of_two(mixed):
    cfg = config(mixed)
    one = device_decode_pipeline(cfg)
    crops, _, encoded = one.crops[(0, 1)]
    views_one = one.render(crops, 0, 1, encoded)
    for rank in range(2):
        two = device_decode_pipeline(cfg, rank, 2)
        crops, _, encoded = two.crops[(0, 1)]
        for v1, v2 in zip(views_one, two.render(crops, 0, 1, encoded)):
            torch.testing.assert_close(v1[rank::2], v2, rtol=0, atol=1e-5)


def test_device_decode_through_loader_workers(mixed):
    """The encoded rows travel through 2 loader workers: the epoch's batches equal the main process's."""
    main = list(device_decode_pipeline(config(mixed)).batches(1))
    got = list(device_decode_pipeline(config(mixed, "data.num_workers=2")).batches(1))
    assert len(got) == len(main) == 2
    for (views_a, labels_a), (views_b, labels_b) in zip(main, got):
        assert torch.equal(labels_a, labels_b) and [tuple(v.shape) for v in views_a] == [(8, 3, SIZE, SIZE)] * 2
        for a, b in zip(views_a, views_b):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_data_decode_setting(photos):
    cpu = torch.device("cpu")
    assert decode_on_device("auto", cpu) is False and decode_on_device("cpu", cpu) is False
    with pytest.raises(UserError, match="data.decode=gpu decodes JPEGs on a CUDA training device.*data.decode=cpu"):
        decode_on_device("gpu", cpu)
    assert config(photos).data.decode == "auto"
    for bad in (["data.decode=gpu", "data.name=fashion_mnist"], ["data.decode=gpu", "data.pipeline=workers"]):
        with pytest.raises(UserError, match="data.decode=gpu decodes image files in data.pipeline=split"):
            config(photos, *bad)
    with pytest.raises(UserError, match="data.decode"):
        config(photos, "data.decode=nvjpeg")


def test_device_decode_of_a_shard_stream(photos, tmp_path):
    """Shards deliver each step's files with its key: the encoded rows are the stream's, decoded like the CPU's."""
    from batchssl.shards import ShardStream, convert
    from test_decode import CROP_TOLERANCE

    convert(photos, tmp_path, shard_size=4)
    cfg = config(tmp_path, "data.name=shards")
    info = dataset_info(cfg.data)
    cpu = build_split_pipeline(cfg, info, torch.device("cpu"))
    stream = ShardStream(tmp_path, cfg.seed, cfg.train.batch_size, buffer=cfg.data.shuffle_buffer)
    gpu = SplitPipeline(cfg, info, None, torch.device("cpu"), stream=stream, device_decode=True)
    keys = list(zip(gpu.loader.sampler, cpu.loader.sampler))
    assert len(keys) == 2
    for key, cpu_key in keys:
        (worker_crops, labels, encoded), (cpu_crops, cpu_labels) = gpu.crops[key], cpu.crops[cpu_key]
        assert torch.equal(labels, cpu_labels) and len(encoded.rows) == len(labels)  # every photo is a JPEG
        for a, b in zip(gpu._merge(worker_crops, encoded), cpu_crops):
            assert (a.double() - b.double()).abs().flatten(1).mean(1).max() < CROP_TOLERANCE
