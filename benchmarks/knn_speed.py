"""Speed, memory and agreement of the weighted-kNN evaluators, side by side.

Methods, all on the same L2-normalised float32 features, the same k, T and query batch size:
  ours      batchssl.eval.knn.knn_classify (FAISS IndexFlatIP, one search for all k, batched queries; the time
            includes building the index)
  lightly   lightly.utils.benchmarking.knn_predict, called per query batch as its docs show
  matmul    plain torch: batch @ bank.T, topk, exp(s / T) weights, scatter_add vote
  ceiling   torch.mm of the same shapes alone, into a preallocated output: the GEMM an exact search cannot avoid

Features are clustered (one Gaussian cluster per class, overlapping) so that the predictions mean something.
Every run is a fresh subprocess; "peak MiB" is how far its peak resident set size (VmHWM, reset through
/proc/self/clear_refs once the inputs are loaded and the method imported) rose above the resident size at
that point: the extra memory the method needs at its worst moment. (getrusage's ru_maxrss cannot do this: a
child started by fork/vfork + exec inherits the parent's peak.) Linux only. Time is the median of --repeats
runs, taken round robin over the methods so that other work on the machine slows them all alike. GFLOP/s
counts the 2 N M D multiply-adds of the similarity matrix only. Agreement is the % of queries whose top-1
prediction equals ours.

    python benchmarks/knn_speed.py                        # N = 60000 bank, M = 10000 queries, D = 128 512 2048
    python benchmarks/knn_speed.py --n 20000 --m 5000 --dims 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("ours", "lightly", "matmul", "ceiling")


def make_features(n: int, m: int, dim: int, num_classes: int, noise: float, seed: int = 0):
    """Bank and queries drawn from the same class clusters; unit-norm float32."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)

    def draw(count: int):
        labels = torch.randint(0, num_classes, (count,), generator=g)
        feats = centers[labels] + noise * torch.randn(count, dim, generator=g) / dim**0.5
        return F.normalize(feats, dim=1), labels

    return (*draw(n), *draw(m))


def run_method(method: str, bank, bank_labels, queries, query_labels, args) -> tuple[Callable, Callable]:
    """(timed function, function returning top-1 predictions or None) for one method."""
    n_batches = range(0, len(queries), args.batch_size)
    if method == "ours":
        from batchssl.eval.knn import knn_classify, knn_predict_scores

        def timed():
            knn_classify(
                bank,
                bank_labels,
                queries,
                query_labels,
                ks=(args.k,),
                temperature=args.t,
                num_classes=args.classes,
                batch_size=args.batch_size,
            )

        def predict():
            return knn_predict_scores(
                bank,
                bank_labels,
                queries,
                k=args.k,
                temperature=args.t,
                num_classes=args.classes,
                batch_size=args.batch_size,
            ).argmax(1)

        return timed, predict

    if method == "lightly":
        from lightly.utils.benchmarking import knn_predict

        def predict():
            return torch.cat(
                [
                    knn_predict(
                        queries[i : i + args.batch_size], bank.T, bank_labels, args.classes, knn_k=args.k, knn_t=args.t
                    )[:, 0]
                    for i in n_batches
                ]
            )

        return predict, predict

    if method == "matmul":

        def predict():
            out = []
            for i in n_batches:
                sims, idx = (queries[i : i + args.batch_size] @ bank.T).topk(args.k, dim=1)
                weights = torch.exp((sims - sims[:, :1]) / args.t)
                scores = torch.zeros(len(sims), args.classes).scatter_add_(1, bank_labels[idx], weights)
                out.append(scores.argmax(1))
            return torch.cat(out)

        return predict, predict

    buffer = torch.empty(args.batch_size, len(bank))

    def ceiling():
        for i in n_batches:
            q = queries[i : i + args.batch_size]
            torch.mm(q, bank.T, out=buffer[: len(q)])

    return ceiling, lambda: None


def worker(args) -> None:
    """One timed run of one method in this fresh process; saves its predictions when asked."""
    data = Path(args.data)
    bank, bank_labels, queries, query_labels = (
        torch.from_numpy(np.load(data / f"{name}.npy")) for name in ("bank", "bank_labels", "queries", "query_labels")
    )
    timed, predict = run_method(args.worker, bank, bank_labels, queries, query_labels, args)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS, the inputs loaded
    base = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    timed()
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM")
    if args.save_predictions and (preds := predict()) is not None:
        np.save(data / f"pred_{args.worker}.npy", preds.numpy())
    print(json.dumps({"seconds": seconds, "peak_mib": (peak - base) / 1024}))


def _proc_status_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in KiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def measure(method: str, data: Path, args, save_predictions: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--data",
        str(data),
        "--k",
        str(args.k),
        "--t",
        str(args.t),
        "--classes",
        str(args.classes),
        "--batch-size",
        str(args.batch_size),
    ]
    done = subprocess.run(cmd + ["--save-predictions"] * save_predictions, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60000, help="bank size")
    parser.add_argument("--m", type=int, default=10000, help="number of queries")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--t", type=float, default=0.1, help="temperature")
    parser.add_argument(
        "--noise",
        type=float,
        default=4.0,
        help="cluster spread at D=128, relative to the centres' norm; scaled by (D / 128) ** 0.4 so "
        "that top-1 stays at 80-90 %% at every D (high D would otherwise separate the clusters)",
    )
    parser.add_argument("--batch-size", type=int, default=4096, help="queries per batch, every method")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--save-predictions", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(
        f"bank N={args.n}, queries M={args.m}, k={args.k}, T={args.t}, {args.classes} classes, query batch "
        f"{args.batch_size}, median of {args.repeats}; torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    header = f"{'D':>5} {'method':<8} {'seconds':>8} {'GFLOP/s':>8} {'peak MiB':>9} {'agree %':>8}  ratios"
    print(header)
    print("-" * len(header))
    for dim in args.dims:
        noise = args.noise * (dim / 128) ** 0.4
        bank, bank_labels, queries, query_labels = make_features(args.n, args.m, dim, args.classes, noise)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp)
            for name, array in (
                ("bank", bank),
                ("bank_labels", bank_labels),
                ("queries", queries),
                ("query_labels", query_labels),
            ):
                np.save(data / f"{name}.npy", array.numpy())
            # Round robin over the methods, so that load from other work on the machine hits them all alike.
            runs = {method: [] for method in METHODS}
            for repeat in range(args.repeats):
                for method in METHODS:
                    runs[method].append(measure(method, data, args, save_predictions=repeat == 0))
            results = {
                method: {
                    "seconds": statistics.median(r["seconds"] for r in rs),
                    "peak_mib": max(r["peak_mib"] for r in rs),
                }
                for method, rs in runs.items()
            }
            preds = {method: np.load(data / f"pred_{method}.npy") for method in ("ours", "lightly", "matmul")}
        flops = 2 * args.n * args.m * dim
        ours, lightly, ceiling = (results[m]["seconds"] for m in ("ours", "lightly", "ceiling"))
        for method, r in results.items():
            agree = f"{100 * np.mean(preds[method] == preds['ours']):8.2f}" if method in preds else f"{'-':>8}"
            ratio = ""
            if method == "ours":
                accuracy = 100 * np.mean(preds["ours"] == query_labels.numpy())
                ratio = (
                    f"{lightly / ours:.2f}x lightly's speed, {ceiling / ours:.2f}x the ceiling's "
                    f"(top-1 {accuracy:.1f} %)"
                )
            print(
                f"{dim:>5} {method:<8} {r['seconds']:8.3f} {flops / r['seconds'] / 1e9:8.1f} "
                f"{r['peak_mib']:9.0f} {agree}  {ratio}"
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other work on this machine skews timings)")


if __name__ == "__main__":
    main()
