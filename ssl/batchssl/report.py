"""`python -m batchssl.report RUN_DIR`: one short table of what a run reached (make demo ends with it)."""

import json
import sys
from pathlib import Path


def rows(run: Path) -> list[tuple[str, str]]:
    out = []
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "metrics.jsonl").is_file() else []
    steps = [m for m in metrics if "loss" in m]
    if steps:
        last = steps[-1]
        speed = sorted(m["images_per_s"] for m in steps)[len(steps) // 2]
        out.append(("training", f"epoch {last['epoch']}, step {last['step']}, loss {last['loss']:.4f}, "
                                f"median {speed:.0f} images/s"))
    monitor = [m for m in metrics if "knn_top1" in m]
    if monitor:
        m = monitor[-1]
        out.append((f"kNN monitor (k={m['knn_k']}, epoch {m['epoch']})", f"top-1 {m['knn_top1']:.2f}"))
    if (run / "knn.json").is_file():
        knn = json.loads((run / "knn.json").read_text())
        for k, v in knn["results"].items():
            out.append((f"kNN eval (k={k}, T={knn['temperature']})", f"top-1 {v['top1']:.2f}, top-5 {v['top5']:.2f}"))
    if (run / "linear_probe.json").is_file():
        for mode, v in json.loads((run / "linear_probe.json").read_text()).items():
            out.append((f"linear probe ({mode})", f"top-1 {v['top1']:.2f} (lr {v['lr']:g}, {v['seconds']:.0f} s)"))
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m batchssl.report RUN_DIR", file=sys.stderr)
        sys.exit(2)
    table = rows(Path(argv[0]))
    width = max(len(name) for name, _ in table) if table else 0
    print(f"\nResults of {argv[0]}")
    for name, value in table:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
