"""Tables and pictures of a run.

    python -m batchssl.report RUN                 the table of what RUN reached (make demo ends with it) and
                                                  RUN/curves.png: loss, lr, kNN / online top-1, z-std, images/s
    python -m batchssl.report RUN --embedding     also RUN/embedding.png: a t-SNE map of 2,000 validation features
    python -m batchssl.report --compare A B ...   runs overlaid (e.g. with and without BatchFormer) in one figure,
                                                  --out PATH (default compare.png in the current directory)

Everything is read from the run directory: metrics.jsonl (step lines have "loss", monitor lines "knn_top1"),
config.yaml (method.proj_dim for the z-std reference, monitor.collapse_fraction for the collapse alarm's line),
knn.json and linear_probe.json of the evaluators ({"entries": {settings: record}, "latest": settings}).
Pictures are drawn with matplotlib's Agg canvas (no display, no global pyplot state); a metric a run did not log
leaves its panel out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import yaml

from batchssl.errors import UserError, exit_on_user_error

CURVES_FILE = "curves.png"
EMBEDDING_FILE = "embedding.png"
PANEL_INCHES = (5.0, 3.6)  # one panel; a figure is a grid of at most 3 panels a row
DPI = 100
EMBEDDING_INCHES = (7.0, 6.0)

CLASS_NAMES = {
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "stl10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
}


# --------------------------------------------------------------------------------------------------- reading


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median_images_per_s(metrics: list[dict]) -> float | None:
    """A run's training speed: the median of its logged intervals' images/s (robust to the slow first interval and
    to the kNN passes between epochs); None when the run logged none."""
    speeds = [m["images_per_s"] for m in metrics if "images_per_s" in m]
    return statistics.median(speeds) if speeds else None


def read_config(run: Path) -> dict:
    path = Path(run) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def proj_dim(run: Path) -> int | None:
    value = read_config(run).get("method", {}).get("proj_dim")
    return int(value) if isinstance(value, (int, float)) and value >= 1 else None


def collapse_fraction(run: Path) -> float | None:
    """The run's collapse alarm threshold as a fraction of the healthy z-std (monitor.collapse_fraction)."""
    value = read_config(run).get("monitor", {}).get("collapse_fraction")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def steps_per_epoch(metrics: list[dict]) -> float | None:
    """Every line of epoch e has step <= e * steps_per_epoch, with equality at the epoch's last step (always
    logged) and for the monitor lines: the largest step / epoch is the number of steps in an epoch."""
    ratios = [m["step"] / m["epoch"] for m in metrics if m.get("epoch") and "step" in m]
    return max(ratios) if ratios else None


def series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of `key`, x in fractional epochs (step / steps per epoch); non-numbers skipped."""
    spe = steps_per_epoch(metrics)
    xs, ys = [], []
    for m in metrics:
        value = m.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        x = m["step"] / spe if spe and "step" in m else m.get("epoch", len(xs))
        xs.append(x)
        ys.append(float(value))
    return xs, ys


def read_results(path: Path) -> dict:
    """An evaluator's results file: {"entries": {KEY: RECORD}, "latest": KEY} (batchssl.cli.record_result)."""
    try:
        document = json.loads(Path(path).read_text())
    except ValueError:
        document = None
    if not (isinstance(document, dict) and isinstance(document.get("entries"), dict)):
        raise UserError(
            f'{path} is not an evaluator\'s results file (no "entries"): was it written by another '
            "version? Rerun the evaluator after moving it away"
        )
    return document


def _entries(path: Path) -> list[tuple[str, dict]]:
    """(KEY, RECORD) pairs of a results file, the latest one last and the others in file order."""
    document = read_results(path)
    return sorted(document["entries"].items(), key=lambda kv: kv[0] == document.get("latest"))  # sort is stable


def _fmt(value, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def _knn_rows(entries: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    out = []
    for key, record in entries:
        tag = f"  [{key}]" if len(entries) > 1 else ""  # which settings, when several
        for k, v in record.get("results", {}).items():
            out.append(
                (
                    f"kNN eval (k={k}, T={record.get('temperature', '?')})",
                    f"top-1 {_fmt(v.get('top1'))}, top-5 {_fmt(v.get('top5'))}{tag}",
                )
            )
    return out


def _probe_rows(entries: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    out = []
    for key, record in entries:  # one probe's result each
        tag = f"  [{key}]" if len(entries) > 1 else ""
        extra = []
        if isinstance(record.get("lr"), (int, float)):
            extra.append(f"lr {record['lr']:g}")
        if isinstance(record.get("seconds"), (int, float)):
            extra.append(f"{record['seconds']:.0f} s")
        out.append(
            (
                f"linear probe ({record.get('mode', '?')})",
                f"top-1 {_fmt(record.get('top1'))}" + (f" ({', '.join(extra)})" if extra else "") + tag,
            )
        )
    return out


def rows(run: Path) -> list[tuple[str, str]]:
    """The table of what a run reached: (name, value) pairs."""
    run = Path(run)
    out = []
    metrics = read_metrics(run)
    steps = [m for m in metrics if "loss" in m]
    if steps:
        last = steps[-1]
        median = median_images_per_s(steps)
        speed = f", median {median:.0f} images/s" if median is not None else ""
        out.append(("training", f"epoch {last['epoch']}, step {last['step']}, loss {last['loss']:.4f}{speed}"))
    monitor = [m for m in metrics if "knn_top1" in m]
    if monitor:
        m = monitor[-1]
        out.append((f"kNN monitor (k={m.get('knn_k', '?')}, epoch {m['epoch']})", f"top-1 {m['knn_top1']:.2f}"))
    online = [m for m in metrics if "online_top1" in m]
    if online:
        m = online[-1]
        top5 = f", top-5 {m['online_top5']:.2f}" if "online_top5" in m else ""
        out.append((f"online linear (epoch {m['epoch']})", f"top-1 {m['online_top1']:.2f}{top5}"))
    z = [m["z_std"] for m in metrics if isinstance(m.get("z_std"), (int, float))]
    d, fraction = proj_dim(run), collapse_fraction(run)
    if z and d:
        healthy = 1 / math.sqrt(d)
        # below the collapse alarm's threshold (whether or not it has fired: that also takes its patience)
        verdict = "  COLLAPSED?" if fraction and z[-1] < fraction * healthy else ""
        out.append(("z-std (last)", f"{z[-1]:.4f} (healthy ~ 1/sqrt({d}) = {healthy:.4f}){verdict}"))
    if (run / "knn.json").is_file():
        out.extend(_knn_rows(_entries(run / "knn.json")))
    if (run / "linear_probe.json").is_file():
        out.extend(_probe_rows(_entries(run / "linear_probe.json")))
    for name in (CURVES_FILE, EMBEDDING_FILE):
        if (run / name).is_file():
            out.append((f"picture ({Path(name).stem})", str(run / name)))
    return out


def print_table(run: Path) -> None:
    table = rows(run)
    width = max(len(name) for name, _ in table) if table else 0
    print(f"\nResults of {run}")
    for name, value in table:
        print(f"  {name:<{width}}  {value}")


# --------------------------------------------------------------------------------------------------- drawing


def _grid(panels: int) -> tuple[int, int]:
    """(rows, columns): one row up to 3 panels, 2 x 2 for 4, then rows of 3."""
    cols = panels if panels <= 3 else 2 if panels == 4 else 3
    return math.ceil(panels / cols), cols


def figure_pixels(panels: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with that many panels."""
    rows_, cols = _grid(panels)
    return round(PANEL_INCHES[0] * cols * DPI), round(PANEL_INCHES[1] * rows_ * DPI)


def _figure(panels: int):
    """An Agg figure (no pyplot) with a grid for `panels` panels, and the list of its axes."""
    from matplotlib.figure import Figure

    rows_, cols = _grid(panels)
    fig = Figure(figsize=(PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows_), dpi=DPI, layout="constrained")
    axes = [fig.add_subplot(rows_, cols, i + 1) for i in range(panels)]
    return fig, axes


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _line(ax, xs, ys, label=None, color=None, marker=None):
    """Step-level curves get a faint raw line under a smoothed one; sparse ones (monitor) get markers."""
    if len(xs) > 30:
        (smooth,) = ax.plot(xs, _smooth(ys, max(2, len(xs) // 30)), color=color, label=label, linewidth=1.5)
        ax.plot(xs, ys, color=smooth.get_color(), alpha=0.25, linewidth=0.8, zorder=smooth.get_zorder() - 0.1)
    else:
        ax.plot(xs, ys, color=color, label=label, marker=marker or ("o" if len(xs) < 30 else None), markersize=4)


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


def plot_curves(run: Path, out: Path | None = None) -> Path | None:
    """RUN/curves.png (or `out`): one panel per metric the run logged; None when it logged none."""
    run = Path(run)
    metrics = read_metrics(run)
    has = {key for m in metrics for key in m}
    panels = []  # (title, ylabel, draw(ax))

    loss_keys = [k for k in ("loss", "loss_main", "loss_bf") if k in has]
    if loss_keys:

        def draw_loss(ax):
            for key in loss_keys:
                _line(ax, *series(metrics, key), label=key)
            ax.legend(fontsize=8)

        panels.append(("training loss", "loss", draw_loss))
    if "lr" in has:
        panels.append(("learning rate", "lr", lambda ax: _line(ax, *series(metrics, "lr"))))
    accuracy = [
        (k, name) for k, name in (("knn_top1", "kNN top-1"), ("online_top1", "online linear top-1")) if k in has
    ]
    if accuracy:

        def draw_accuracy(ax):
            for key, name in accuracy:
                _line(ax, *series(metrics, key), label=name, marker="o")
            ax.legend(fontsize=8)

        panels.append(("validation top-1", "top-1 (%)", draw_accuracy))
    if "z_std" in has:
        d, fraction = proj_dim(run), collapse_fraction(run)

        def draw_z(ax):
            _line(ax, *series(metrics, "z_std"), label="z-std")
            if d:
                ax.axhline(1 / math.sqrt(d), color="green", linestyle="--", linewidth=1, label=f"healthy 1/sqrt({d})")
            if d and fraction:
                ax.axhline(
                    fraction / math.sqrt(d),
                    color="red",
                    linestyle=":",
                    linewidth=1,
                    label=f"collapse alarm {fraction:g}/sqrt({d})",
                )
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)

        panels.append(("std of l2-normalised z", "z-std", draw_z))
    if "images_per_s" in has:
        panels.append(("throughput", "images / s", lambda ax: _line(ax, *series(metrics, "images_per_s"))))
    if not panels:
        return None

    fig, axes = _figure(len(panels))
    for ax, (title, ylabel, draw) in zip(axes, panels):
        draw(ax)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(str(run))
    return _save(fig, out or run / CURVES_FILE)


def _run_labels(runs: list[Path]) -> list[str]:
    """The run directories' names; where two are equal, enough parent folders to tell them apart."""
    parts = [Path(r).resolve().parts for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in runs]


def plot_compare(runs: list[Path], out: Path) -> Path:
    """Runs overlaid: loss, kNN top-1, online top-1, z-std over epochs, one colour per run."""
    runs = [Path(r) for r in runs]
    for run in runs:
        if not (run / "metrics.jsonl").is_file():
            raise UserError(f"{run} has no metrics.jsonl: is it a BatchSSL run directory?")
    metrics = [read_metrics(r) for r in runs]
    labels = _run_labels(runs)
    panels = [
        (key, title, ylabel)
        for key, title, ylabel in (
            ("loss", "training loss", "loss"),
            ("knn_top1", "kNN top-1", "top-1 (%)"),
            ("online_top1", "online linear top-1", "top-1 (%)"),
            ("z_std", "std of l2-normalised z", "z-std"),
        )
        if any(key in m for ms in metrics for m in ms)
    ]
    if not panels:
        raise UserError("none of the runs logged loss, knn_top1, online_top1 or z_std")
    fig, axes = _figure(len(panels))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, title, ylabel) in zip(axes, panels):
        for run, ms, label, colour in zip(runs, metrics, labels, colours):
            xs, ys = series(ms, key)
            if xs:
                _line(ax, xs, ys, label=label, color=colour, marker="o")
            d = proj_dim(run)
            if key == "z_std" and d:
                ax.axhline(1 / math.sqrt(d), color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
        if key == "z_std":
            ax.set_ylim(bottom=0)
        ax.set_title(title + (" (dashed: 1/sqrt(proj_dim))" if key == "z_std" else ""))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)


# --------------------------------------------------------------------------------------------------- embedding
# t-SNE (scikit-learn), not UMAP: both install next to the pinned torch / numpy without changing them, but
# umap-learn brings numba + llvmlite (large, a JIT compile of several seconds on first use, and numba caps the numpy
# versions it accepts, so it would hold back numpy upgrades), while scikit-learn is one well-pinned wheel with
# scipy. For 2,000 points t-SNE takes seconds on two cores, and its map is the one SSL papers show.


def embedding_png(
    features,
    labels,
    out: Path,
    class_names: list[str] | None = None,
    title: str | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> Path:
    """A 2-D t-SNE map of (N, D) features coloured by their (N,) labels, written to `out`.

    Features are l2-normalised first (the kNN monitor's cosine geometry) and reduced to 50 dimensions by PCA
    (the usual t-SNE preprocessing); everything is seeded, so the same features give the same picture.
    `threads` caps t-SNE's OpenMP threads (None: all cores). On a busy machine 1 is faster: OpenMP threads
    spin-wait for cores that other processes hold (2,000 points on 2 loaded cores: 24 s with 1 thread, 50 s
    with 2)."""
    import numpy as np

    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits
    except ImportError as err:
        raise UserError("--embedding needs scikit-learn: pip install 'batchssl[report]' (or scikit-learn)") from err

    x = np.asarray(features.float().numpy() if hasattr(features, "numpy") else features, dtype=np.float64)
    y = np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 5:
        raise ValueError(f"embedding_png: need (N, D) features and N labels, N >= 5; got {x.shape}, {y.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)
    with threadpool_limits(threads, user_api="openmp"):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)

    fig, (ax,) = _figure(1)
    fig.set_size_inches(*EMBEDDING_INCHES)
    classes = sorted(set(y.tolist()))
    cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"
    from matplotlib import colormaps

    colours = colormaps[cmap].resampled(max(len(classes), 2)) if cmap == "turbo" else colormaps[cmap]
    for i, c in enumerate(classes):
        rows_ = y == c
        name = class_names[c] if class_names and 0 <= c < len(class_names) else str(c)
        ax.scatter(xy[rows_, 0], xy[rows_, 1], s=5, color=colours(i), label=name, alpha=0.8, linewidths=0)
    if len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(x)} features")
    return _save(fig, out)


def plot_embedding(
    run: Path,
    samples: int = 2000,
    out: Path | None = None,
    overrides: list[str] | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> Path:
    """RUN/embedding.png: the t-SNE map of the frozen backbone's features of the first `samples` validation
    images (the evaluation transform, the run's precision)."""
    from torch.utils.data import Subset

    from batchssl.eval.features import extract_features
    from batchssl.eval.frozen import FrozenSource, load_frozen

    run = Path(run)
    frozen = load_frozen(FrozenSource(run=str(run), overrides=list(overrides or [])))
    _, val = frozen.eval_splits()
    n = min(samples, len(val))
    features, labels = extract_features(frozen.backbone, Subset(val, range(n)), batch_size=512, dtype=frozen.dtype)
    dataset = frozen.cfg.data.name
    return embedding_png(
        features,
        labels,
        out or run / EMBEDDING_FILE,
        class_names=CLASS_NAMES.get(dataset),
        title=f"{run.name}: t-SNE of {n} {dataset} validation features",
        seed=seed,
        threads=threads,
    )


# --------------------------------------------------------------------------------------------------- command line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m batchssl.report",
        description="The table of a run's results and its pictures (curves.png; embedding.png with --embedding), "
        "or several runs overlaid (--compare).",
    )
    parser.add_argument("run", nargs="?", help="run directory of pretrain.py")
    parser.add_argument(
        "--embedding",
        action="store_true",
        help="also draw RUN/embedding.png, a t-SNE map of validation features (needs scikit-learn)",
    )
    parser.add_argument("--samples", type=int, default=2000, help="--embedding: validation images (default 2000)")
    parser.add_argument(
        "--threads",
        type=int,
        help="--embedding: t-SNE threads (default: all cores; 1 is faster while other processes hold the cores)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--embedding: config override for loading the data, e.g. data.root=/datasets",
    )
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="overlay these runs in one figure")
    parser.add_argument("--out", help="--compare: the figure's path (default compare.png)")
    parser.add_argument("--no-curves", action="store_true", help="only the table")
    args = parser.parse_args(argv)
    if bool(args.run) == bool(args.compare):
        parser.error("give one RUN directory, or --compare RUN RUN ...")
    with exit_on_user_error("batchssl.report"):
        if args.compare:
            print(f"written {plot_compare([Path(r) for r in args.compare], Path(args.out or 'compare.png'))}")
            return
        run = Path(args.run)
        if not run.is_dir():
            raise UserError(f"run directory not found: {run}")
        if not args.no_curves:
            plot_curves(run)
        if args.embedding:
            if args.samples < 5:
                raise UserError(f"--samples must be >= 5, got {args.samples}")
            plot_embedding(run, args.samples, overrides=args.override, threads=args.threads)
        print_table(run)


if __name__ == "__main__":
    main()
