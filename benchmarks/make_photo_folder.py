"""Build an ImageFolder of real photos at ImageNet-like sizes (about 500x375, JPEG quality 90), with no download.

The sources are the photos that installed packages ship: scikit-learn's china.jpg and flower.jpg and matplotlib's
grace_hopper.jpg. Each output image is a random crop of one source (area 30-100 %, aspect 3:4-4:3), resized so its
longer side is 450-550 px, randomly flipped, saved at quality 90. One class per source photo.

    python benchmarks/make_photo_folder.py /tmp/photos --train 600 --val 60
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image


def source_photos() -> dict[str, Path]:
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    return {"china": sk / "china.jpg", "flower": sk / "flower.jpg", "grace_hopper": mpl / "grace_hopper.jpg"}


def variant(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    area = width * height * rng.uniform(0.3, 1.0)
    aspect = rng.uniform(3 / 4, 4 / 3)
    w = min(width, round((area * aspect) ** 0.5))
    h = min(height, round((area / aspect) ** 0.5))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    crop = image.crop((left, top, left + w, top + h))
    longer = rng.randint(450, 550)
    scale = longer / max(w, h)
    out = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def build(out: Path, train: int, val: int, seed: int = 0) -> Path:
    """Writes out/{train,val}/<photo>/<i>.jpg: `train` and `val` images per split, spread over the photos."""
    rng = random.Random(seed)
    photos = {name: Image.open(path).convert("RGB") for name, path in source_photos().items()}
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            name = list(photos)[i % len(photos)]
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            variant(photos[name], rng).save(folder / f"{i:06d}.jpg", quality=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=600, help="training images (default 600)")
    parser.add_argument("--val", type=int, default=60, help="validation images (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.out, args.train, args.val, args.seed)
    print(f"wrote {args.train} + {args.val} JPEGs under {args.out}")


if __name__ == "__main__":
    main()
