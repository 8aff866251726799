"""batchssl.shards: the converter writes WebDataset-format shards holding the files' bytes; each process streams
its own shards, every image once per epoch, reproducibly; the evaluators read the labelled validation shards;
bad shard directories stop with one line."""

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from batchssl.config import load_config
from batchssl.data import dataset_info, eval_datasets
from batchssl.errors import UserError
from batchssl.filepipeline import build_split_pipeline
from batchssl.shards import INDEX, ShardImages, ShardStream, convert, tar_members
from benchmarks.make_photo_folder import build
from helpers import REPO


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build(tmp_path_factory.mktemp("photos"), train=22, val=5)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    convert(folder, out, shard_size=4)
    return out


def test_converter_writes_webdataset_shards_of_the_files_bytes(folder, shards):
    names = sorted(p.name for p in shards.iterdir())
    assert names == [INDEX] + [f"train-{i:06d}.tar" for i in range(6)] + ["val-000000.tar", "val-000001.tar"]
    with tarfile.open(shards / "train-000000.tar") as tar:
        members = tar.getnames()
        assert members[:2] == ["000000000.jpg", "000000000.cls"]  # a sample's members are adjacent, one key
    images = ShardImages(shards, "train")
    assert len(images) == 22
    classes = sorted(p.name for p in (folder / "train").iterdir())
    originals = {p.read_bytes(): classes.index(p.parent.name) for p in (folder / "train").rglob("*.jpg")}
    for i in range(len(images)):
        data, name, label = images.read(i)
        assert originals[data] == label and "train-0000" in name and " key " in name
    assert sorted(images.targets) == sorted(originals.values())
    assert len({images.targets[i] for i in range(4)}) > 1  # shuffled before sharding: classes mixed


def test_each_process_streams_its_own_shards_every_image_once(shards):
    streams = [ShardStream(shards, seed=0, global_batch=4, rank=r, world=2, buffer=3) for r in range(2)]
    for epoch in (0, 1):
        own = [s.epoch_shards(epoch) for s in streams]
        assert len(own[0]) == len(own[1]) == 3 and not set(own[0]) & set(own[1])
        for s, names in zip(streams, own):
            seen = [name for _, name, _ in s.samples(epoch)]
            assert len(seen) == len(set(seen)) == sum(min(4, 22 - 4 * int(n[6:12])) for n in names)
            assert {n.split(" key ")[0].rsplit("/", 1)[1] for n in seen} == set(names)
            assert seen == [name for _, name, _ in s.samples(epoch)]  # reproducible: a resume re-reads it
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch == (4 + 4 + 2) // 2
    assert [n for _, n, _ in streams[0].samples(0)] != [n for _, n, _ in streams[0].samples(1)]


def test_pretraining_and_evaluation_read_the_shards(shards):
    cfg = load_config(
        "recipes/imagenet/mocov3_r50.yaml",
        ["data.name=shards", f"data.root={shards}", "data.image_size=32", "train.batch_size=4", "data.num_workers=0"],
    )
    info = dataset_info(cfg.data)
    assert info.num_classes == 3
    bank, val = eval_datasets(cfg.data)
    assert (len(bank), len(val)) == (22, 5) and val[0][0].mode == "RGB"
    pipeline = build_split_pipeline(cfg, info, torch.device("cpu"), rank=1, world=2)
    batches = list(pipeline.batches(0))
    assert len(batches) == pipeline.steps_per_epoch == 5
    assert [tuple(v.shape) for v in batches[0][0]] == [(2, 3, 32, 32)] * 2
    again = list(pipeline.batches(0))
    assert all(torch.equal(a, b) for (va, _), (vb, _) in zip(batches, again) for a, b in zip(va, vb))


def test_missing_index_and_missing_validation_split_say_what_to_do(folder, tmp_path):
    with pytest.raises(UserError, match="no shards.json: convert an ImageFolder first"):
        ShardImages(tmp_path, "train")
    (folder_no_val := tmp_path / "noval").mkdir()
    (folder_no_val / "train").symlink_to(folder / "train")
    convert(folder_no_val, tmp_path / "out", shard_size=10)
    with pytest.raises(UserError, match=r"no labelled validation shards.*val/<class>/.*data.holdout=N"):
        ShardImages(tmp_path / "out", "val")
    with pytest.raises(UserError, match="3 training shards for 4 processes"):
        ShardStream(tmp_path / "out", 0, global_batch=8, world=4)


def test_a_corrupt_image_names_the_shard_and_key(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in shards.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    data = bytearray((bad / "train-000001.tar").read_bytes())
    with tarfile.open(bad / "train-000001.tar") as tar:
        member = tar.getmember(tar.getnames()[0])
    data[member.offset_data + 200 : member.offset_data + member.size] = b"\0" * (member.size - 200)
    (bad / "train-000001.tar").write_bytes(bytes(data))
    cfg = load_config(
        "recipes/imagenet/mocov3_r50.yaml",
        ["data.name=shards", f"data.root={bad}", "data.image_size=32", "train.batch_size=22", "data.num_workers=0"],
    )
    pipeline = build_split_pipeline(cfg, dataset_info(cfg.data), torch.device("cpu"))
    key = Path(member.name).stem
    with pytest.raises(UserError, match=f"train-000001.tar key {key}"):
        list(pipeline.batches(0))
    (bad / "train-000002.tar").write_bytes((bad / "train-000002.tar").read_bytes()[:700])
    with pytest.raises(UserError, match="train-000002.tar"):
        ShardImages(bad, "train")


def test_converter_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "batchssl.shards", str(tmp_path / "nowhere"), str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"batchssl.shards: error: {tmp_path / 'nowhere'} has no train/ "
        "folder: the ImageFolder layout is train/<class>/*, val/<class>/*"
    ]


def _tarfile_listing(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size, tar.extractfile(m).read()) for m in tar if m.isfile()]


def test_fast_tar_reader_reads_what_tarfile_reads(shards):
    for path in sorted(shards.glob("*.tar")):
        with open(path, "rb") as f:
            assert list(tar_members(f)) == _tarfile_listing(path)
        with open(path, "rb") as f:
            assert [m[:3] for m in tar_members(f, read_data=False)] == [m[:3] for m in _tarfile_listing(path)]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_dialects_the_fast_reader_leaves_to_tarfile_read_the_same(tmp_path, fmt):
    """Other writers' long names come as PAX or GNU extension headers, after ordinary members: tarfile takes over
    there, and every member is read once, in order."""
    path = tmp_path / "other.tar"
    names = ["a.jpg", "a.cls", "sub/dir/" + "x" * 150 + ".jpg", "b.jpg", "c" * 120 + ".cls"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 + i
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    with open(path, "rb") as f:
        assert list(tar_members(f)) == _tarfile_listing(path)
    assert [m[0] for m in _tarfile_listing(path)] == names


def test_a_damaged_tar_header_names_the_shard(shards, tmp_path):
    for p in shards.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1].offset  # its header's first byte
    data = bytearray(path.read_bytes())
    data[second + 10] ^= 0xFF  # a byte of the member's name
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"cannot read shard .*train-000000.tar: bad header checksum"):
        ShardImages(tmp_path, "train")
