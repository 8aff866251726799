"""Sharded datasets in the WebDataset format: a converter from an ImageFolder, random-access and streaming readers.

    python -m batchssl.shards IMAGEFOLDER OUT --shard-size 1000

writes OUT/train-000000.tar, ... and OUT/val-000000.tar, ... (from IMAGEFOLDER/train/<class>/* and val/<class>/*)
and OUT/shards.json (classes, and each shard's name and sample count), written last: a directory without it is an
unfinished conversion. Each sample is two tar members sharing a key, WebDataset's convention: `<key>.<ext>`, the
original file's bytes untouched (jpg, png, ...), and `<key>.cls`, the class index as text; so
`webdataset.WebDataset(urls).decode("pil").to_tuple("jpg;png", "cls")` reads the shards too. The training
images are shuffled once with a fixed seed before they are cut into shards, so each shard mixes the classes.

The readers parse the tar headers themselves (`tar_members`; tarfile takes over at a PAX or GNU long-name header,
as other writers may produce): tarfile's Python header parsing cost about 1 ms per sample, slower than reading the
folder the shards came from (benchmarks/shard_speed.py). Shards stay uncommitted to any one loader library; no
dependency was worth adding for sequential file I/O.

Readers:
- `ShardImages(root, split)`: random access (the kNN bank, the probes, the validation split): member offsets are
  read from the tar headers once, then each image is one seek + read.
- `ShardStream`: pretraining. In epoch e the training shards are permuted by (seed, e) and process r of W takes
  shards r, r+W, ... (every process the same number, n // W; the remainder sits the epoch out, a different
  one each epoch). It reads them in order, sequentially, through a shuffle buffer seeded by (seed, epoch, rank),
  and every step takes batch / W images from it. Steps per epoch: the smallest image count any process can get,
  divided by its batch share, so every process makes the same number of steps; the images left over in an epoch
  are skipped (other ones each epoch).

Resume: an epoch's stream depends only on (seed, epoch, rank, world) and the shards, so a resumed run meets
exactly the batches the uninterrupted one met, provided it runs with the same number of processes (a different
one deals the shards differently: every image is still seen once per epoch, minus the skipped remainder). From a
step checkpoint the stream is re-read from the epoch's first shard and the files of the steps already done are
skipped without decoding; from an epoch checkpoint the next epoch starts afresh. Unlike the folder
pipelines, the images of a step depend on the number of processes (each reads its own shards); the views of an
image at (epoch, step, position) do not.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from batchssl.errors import UserError, exit_on_user_error
from batchssl.files import atomic_write

INDEX = "shards.json"
FORMAT = "webdataset"


def _shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def convert(folder: str | Path, out: str | Path, shard_size: int, seed: int = 0) -> dict:
    """Write the ImageFolder `folder` (train/, optional val/) as tar shards in `out`; returns the index."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    folder, out = Path(folder), Path(out)
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if not (folder / "train").is_dir():
        raise UserError(f"{folder} has no train/ folder: the ImageFolder layout is train/<class>/*, val/<class>/*")
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{folder / 'train'} has no class folders")
    to_index = {c: i for i, c in enumerate(classes)}
    index = {"format": FORMAT, "classes": classes, "splits": {}}
    for split in ("train", "val"):
        if not (folder / split).is_dir():
            continue
        samples = make_dataset(str(folder / split), to_index, IMG_EXTENSIONS, allow_empty=True)
        if split == "train":  # mixed classes in every shard: a shuffle buffer then sees all of them
            random.Random(seed).shuffle(samples)
        shards = []
        for start in range(0, len(samples), shard_size):
            chunk = samples[start : start + shard_size]
            name = _shard_name(split, len(shards))

            def write(path: Path, chunk=chunk, start=start) -> None:
                with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
                    for i, (path_in, label) in enumerate(chunk):
                        key = f"{start + i:09d}"
                        ext = Path(path_in).suffix.lower().lstrip(".") or "img"
                        _add(tar, f"{key}.{ext}", Path(path_in).read_bytes())
                        _add(tar, f"{key}.cls", str(label).encode())

            atomic_write(out / name, write)
            shards.append({"name": name, "count": len(chunk)})
        index["splits"][split] = shards
    atomic_write(out / INDEX, json.dumps(index, indent=1) + "\n")
    return index


# ------------------------------------------------------------------------------------------------------ readers


def read_index(root: str | Path) -> dict:
    path = Path(root) / INDEX
    if not path.is_file():
        raise UserError(
            f"data.root={root} has no {INDEX}: convert an ImageFolder first with `python -m "
            f"batchssl.shards IMAGEFOLDER {root} --shard-size 1000` (a directory without it is an "
            "unfinished conversion)"
        )
    try:
        index = json.loads(path.read_text())
        assert index["format"] == FORMAT and isinstance(index["splits"]["train"], list)
    except (ValueError, KeyError, AssertionError, TypeError):
        raise UserError(f"{path} is not a batchssl shard index: convert the folder again") from None
    return index


def split_shards(root: str | Path, split: str) -> list[dict]:
    """The shards of a split ('train' or 'val'); a missing labelled validation split says what to pass."""
    index = read_index(root)
    shards = index["splits"].get(split) or []
    if split == "val" and not shards:
        raise UserError(
            f"shard directory {root} has no labelled validation shards (val-*.tar): convert an "
            "ImageFolder with a val/<class>/ folder, or hold out training images with data.holdout=N"
        )
    if not shards:
        raise UserError(f"shard directory {root} has no {split} shards")
    return shards


_BLOCK = 512
_END = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular files (7: contiguous, a regular file to every reader)
_EXTENDED_TYPES = (b"x", b"g", b"L", b"K")  # PAX and GNU long-name headers: left to tarfile


class _NeedsTarfile(Exception):
    """A header this reader leaves to tarfile (PAX / GNU extensions, as other tar writers may use)."""


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for sizes over 8 GiB
        return tarfile.nti(field)
    return int(field.strip(b"\0 ") or b"0", 8)


def _fast_members(f, read_data: bool) -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, data offset, size, data or None) of each regular file of an uncompressed tar read front to back.

    The 512-byte headers are parsed here: tarfile's header parsing costs about 1 ms per sample in Python, which
    made shards read 6x slower than the folder they came from (benchmarks/shard_speed.py). Plain ustar and GNU
    headers, as the converter and most writers produce; a PAX or GNU long-name header raises _NeedsTarfile.
    Reading the data, it only reads forward (a stream would do); listing, it seeks past the data."""
    skip = (lambda n: f.read(n)) if read_data else (lambda n: f.seek(n, 1))
    offset = 0
    while True:
        header = f.read(_BLOCK)
        if not header or header == _END:
            return
        if len(header) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        if sum(header[:148]) + 256 + sum(header[156:]) != _octal(header[148:156]):  # chksum field as 8 spaces
            raise tarfile.ReadError(f"bad header checksum at byte {offset}")
        kind, size = header[156:157], _octal(header[124:136])
        padded = -(-size // _BLOCK) * _BLOCK
        offset += _BLOCK
        if kind in _EXTENDED_TYPES:
            raise _NeedsTarfile
        if kind in _FILE_TYPES:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            if prefix:
                name = f"{prefix.decode('utf-8', 'surrogateescape')}/{name}"
            data = None
            if read_data:
                data = f.read(size)
                if len(data) < size:
                    raise tarfile.ReadError("unexpected end of data")
                skip(padded - size)
            else:
                skip(padded)
            yield name, offset, size, data
        else:
            skip(padded)  # directories, links: nothing to read
        offset += padded


def _tarfile_members(f, read_data: bool) -> Iterator[tuple[str, int, int, bytes | None]]:
    """As _fast_members, through tarfile (every tar dialect, slowly)."""
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if m.isfile():
                yield m.name, m.offset_data, m.size, tar.extractfile(m).read() if read_data else None


def tar_members(f, read_data: bool = True) -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, data offset, size, data or None) of each regular file of the uncompressed tar open in `f` (binary,
    seekable), in order: the fast reader, or tarfile from the first header it leaves to tarfile on."""
    done = 0
    try:
        for member in _fast_members(f, read_data):
            yield member
            done += 1
    except _NeedsTarfile:
        for i, member in enumerate(_tarfile_members(f, read_data)):
            if i >= done:
                yield member


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member name: the base name cut at its first dot."""
    key, _, ext = name.rpartition("/")[2].partition(".")
    return key, ext


def _members(path: Path) -> Iterator[tuple[str, str, int, int]]:
    """(key, extension, data offset, size) of each member of an uncompressed tar, from its headers."""
    try:
        with open(path, "rb") as f:
            for name, offset, size, _ in tar_members(f, read_data=False):
                yield *_split_name(name), offset, size
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"cannot read shard {path}: {err}") from None


class ShardImages:
    """A split of a shard directory as a map-style dataset of (PIL RGB image, label): one seek + read per image.

    Also `read(i)` -> (bytes, name, label) for the split pipeline, `targets` (labels without decoding)."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.shards = [s["name"] for s in split_shards(root, split)]
        rows = []  # (shard, image offset, image size, label)
        self.names: list[str] = []
        for s, name in enumerate(self.shards):
            samples: dict[str, dict] = {}
            for key, ext, offset, size in _members(self.root / name):
                samples.setdefault(key, {})[ext] = (offset, size)
            for key, parts in samples.items():
                image = [(ext, v) for ext, v in parts.items() if ext != "cls"]
                label = self._label(name, key, parts.get("cls"))
                if len(image) != 1:
                    raise UserError(
                        f"shard {self.root / name}, key {key}: expected one image and a .cls, found {sorted(parts)}"
                    )
                rows.append((s, image[0][1][0], image[0][1][1], label))
                self.names.append(f"{self.root / name} key {key}.{image[0][0]}")
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
        self.targets = self.rows[:, 3].tolist()
        self._files: dict[int, object] = {}

    def _label(self, shard: str, key: str, cls) -> int:
        if cls is None:
            raise UserError(f"shard {self.root / shard}, key {key}: no .cls member (the class index)")
        with open(self.root / shard, "rb") as f:
            f.seek(cls[0])
            text = f.read(cls[1])
        try:
            return int(text)
        except ValueError:
            raise UserError(f"shard {self.root / shard}, key {key}: .cls is not a class index: {text[:20]!r}") from None

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, index: int) -> tuple[bytes, str, int]:
        shard, offset, size, label = (int(v) for v in self.rows[index])
        f = self._files.get(shard)
        if f is None:  # one handle per shard and process (loader workers open their own after the fork)
            f = self._files[shard] = open(self.root / self.shards[shard], "rb")  # noqa: SIM115
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise UserError(f"cannot read image {self.names[index]}: the shard is truncated")
        return data, self.names[index], label

    def __getitem__(self, index: int):
        from batchssl.decode import UnreadableImageError

        data, name, label = self.read(index)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB"), label
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(f"cannot read image {name}: {err}") from None

    def __getstate__(self):  # open file handles stay in their process
        return {**self.__dict__, "_files": {}}


class ShardStream:
    """Pretraining from shards: this process's shards of each epoch, read sequentially through a seeded shuffle
    buffer, cut into this process's share of every step's global batch. See the module docstring."""

    def __init__(
        self, root: str | Path, seed: int, global_batch: int, rank: int = 0, world: int = 1, buffer: int = 1000
    ):
        self.root, self.seed, self.rank, self.world, self.buffer = Path(root), seed, rank, world, buffer
        shards = split_shards(root, "train")
        self.shards = [s["name"] for s in shards]
        counts = sorted(s["count"] for s in shards)
        self.per_process = len(shards) // world
        if self.per_process == 0:
            raise UserError(
                f"shard directory {root} has {len(shards)} training shards for {world} processes: "
                "every process needs one; convert again with a smaller --shard-size"
            )
        self.local_batch = global_batch // world
        self.steps_per_epoch = sum(counts[: self.per_process]) // self.local_batch  # the least any process gets
        if self.steps_per_epoch == 0:
            raise UserError(
                f"shard directory {root}: {sum(counts[: self.per_process])} images per process, fewer "
                f"than its share of train.batch_size ({self.local_batch})"
            )

    def epoch_shards(self, epoch: int) -> list[str]:
        """This process's shards in epoch `epoch`, in reading order."""
        from batchssl.data import sample_seed

        order = np.random.default_rng(sample_seed(self.seed, epoch)).permutation(len(self.shards))
        return [self.shards[i] for i in order[: self.per_process * self.world][self.rank :: self.world]]

    def _samples(self, name: str) -> Iterator[tuple[bytes, str, int]]:
        """One shard's (image bytes, name, label), read front to back (a stream: tar's 'r|' mode)."""
        path = self.root / name
        current: dict[str, bytes] = {}
        key = None
        try:
            with open(path, "rb") as f:
                for member, _, _, data in tar_members(f):
                    k, ext = _split_name(member)
                    if k != key and current:
                        yield self._sample(path, key, current)
                        current = {}
                    key = k
                    current[ext] = data
        except (OSError, tarfile.TarError) as err:
            raise UserError(f"cannot read shard {path} (after key {key}): {err}") from None
        if current:
            yield self._sample(path, key, current)

    @staticmethod
    def _sample(path: Path, key: str, parts: dict[str, bytes]) -> tuple[bytes, str, int]:
        image = [(ext, data) for ext, data in parts.items() if ext != "cls"]
        if len(image) != 1 or "cls" not in parts:
            raise UserError(f"shard {path}, key {key}: expected one image and a .cls, found {sorted(parts)}")
        try:
            label = int(parts["cls"])
        except ValueError:
            raise UserError(f"shard {path}, key {key}: .cls is not a class index") from None
        return image[0][1], f"{path} key {key}.{image[0][0]}", label

    def samples(self, epoch: int) -> Iterator[tuple[bytes, str, int]]:
        """This process's images of an epoch, shuffled by a buffer of `buffer` images seeded by (seed, epoch,
        rank): each new image takes the place of a random one in the buffer, which is emitted."""
        from batchssl.data import sample_seed

        rng = np.random.default_rng(sample_seed(self.seed, epoch, self.rank))
        pool: list = []
        for name in self.epoch_shards(epoch):
            for sample in self._samples(name):
                if len(pool) < self.buffer:
                    pool.append(sample)
                    continue
                i = int(rng.integers(len(pool)))
                pool[i], sample = sample, pool[i]
                yield sample
        rng.shuffle(pool)
        yield from pool

    def steps(self, epoch: int) -> Iterator[list[tuple[bytes, str, int]]]:
        """This process's files of each step of an epoch (steps_per_epoch lists of local_batch)."""
        batch: list = []
        step = 0
        for sample in self.samples(epoch):
            batch.append(sample)
            if len(batch) == self.local_batch:
                yield batch
                batch, step = [], step + 1
                if step == self.steps_per_epoch:
                    return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m batchssl.shards",
        description="Convert an ImageFolder (train/<class>/*, val/<class>/*) into WebDataset-format tar shards.",
    )
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of the training images (default 0)")
    args = parser.parse_args(argv)
    with exit_on_user_error("batchssl.shards"):
        index = convert(args.folder, args.out, args.shard_size, args.seed)
    written = [
        f"{len(shards)} {split} shards ({sum(s['count'] for s in shards)} images)"
        for split, shards in index["splits"].items()
    ]
    print(f"wrote {', '.join(written)} to {args.out}")


if __name__ == "__main__":
    main()
