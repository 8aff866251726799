"""Scale on paper: what each ImageNet recipe sends between GPUs per step, and what that costs at 8, 64 and 512 GPUs.

Nothing here runs on more than one process. Each recipe's real model is built and run once on the CPU with a local
batch of 2 (no process group) while recorders count what a process group would carry:
  gradients    the trainable parameters (momentum encoder and frozen patch embedding excluded), float32 as DDP
               all-reduces them: a ring all-reduce moves 2 (P-1)/P x their size per GPU, overlapped with backward
  MoCo keys    every call of the keys' all-gather (rows per image, width, dtype): an all-gather brings
               (P-1)/P x the global size to each GPU, before the loss can start
  BF gather    BatchFormer's gathered attention (batchformer.gather=true): an all-gather of its input forward and a
               reduce-scatter of the same size backward (torch.distributed.nn on NCCL), both on the critical path
  synced BN    every BatchNorm call of the step (all of them are synced when world > 1): torch's SyncBatchNorm
               all-gathers mean, invstd and count (2C + 1 floats) per call forward and all-reduces 2C floats per
               call backward where gradients flow; tiny messages, so their cost is latency: a ring all-gather
               takes P - 1 hops and a tree all-reduce 2 log2 P, at --hop-us each
Seconds = bytes / link bandwidth (one link per GPU, as 8 NICs per 8-GPU node; inside one node NVLink is ~10x
faster, so the 8-GPU row over a network link is the pessimistic case) + the synced-BN latency.

Compute per step: the step's FLOPs at the per-GPU batch (benchmarks/flops.py, meta device) divided by the FLOP rate
the H200 reached on the training step measured in round 1 (benchmarks/results/gpu_check_h200.txt: ResNet-18 CIFAR
stem, 32 px, batch 512, bf16; no ImageNet-sized step was measured on it). That rate is what a ResNet-50 step
would reach only if it used the GPU as well: an estimate, labelled as one. The round-1 step times are printed too.

Efficiency = compute / (max(compute, gradient all-reduce) + critical-path communication), the gradients assumed
fully overlapped with backward (DDP buckets) and everything else not.

    python benchmarks/comm_on_paper.py            # writes benchmarks/results/comm_on_paper.{json,md}
    python benchmarks/comm_on_paper.py --render benchmarks/results/comm_on_paper.json   # the markdown again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

RECIPES = ["simsiam", "simsiam_bf", "mocov3_r50", "mocov3_r50_bf", "mocov3_vit_small", "mocov3_vit_small_bf"]
GPUS = (8, 64, 512)
LINKS_GBPS = (100, 400)
H200_LOG = REPO / "benchmarks" / "results" / "gpu_check_h200.txt"


def ring_allreduce_bytes(size: float, gpus: int) -> float:
    """Bytes each GPU sends (and receives) in a ring all-reduce of `size` bytes: a reduce-scatter then an
    all-gather, each (P-1)/P of the buffer."""
    return 2 * (gpus - 1) / gpus * size


def allgather_bytes(global_size: float, gpus: int) -> float:
    """Bytes each GPU receives in an all-gather whose concatenated result is `global_size` bytes."""
    return (gpus - 1) / gpus * global_size


@dataclasses.dataclass
class Census:
    """What one step of a recipe communicates, per image of the local batch where it scales with the batch."""

    trainable_params: int
    key_gathers: list[tuple[float, int, int]]  # (rows per local image, width, bytes per value) per call
    bf_gathers: list[tuple[float, int, int]]
    bn_forward: list[int]  # channels of every BatchNorm call
    bn_backward: list[int]  # channels of the calls whose output receives gradients


def census(cfg, local_batch: int = 2) -> Census:
    """Run one training step of cfg's method on random images (CPU, no process group) and record its collectives."""
    import batchssl.batchformer as batchformer_module
    import batchssl.methods.mocov3 as mocov3_module
    from batchssl.backbones import build_backbone
    from batchssl.data import dataset_info
    from batchssl.methods import build_method

    info = dataset_info(cfg.data)
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(cfg.model, info.in_channels, info.image_size)
    method = build_method(cfg, backbone, feature_dim).train()
    keys, bf, bn_fwd, bn_bwd = [], [], [], []

    def recorder(calls, original):
        def gather(x):
            calls.append((x.shape[0] / local_batch, int(x[0].numel()), x.element_size()))
            return original(x)

        return gather

    def on_bn(module, _, output):
        bn_fwd.append(module.num_features)
        if output.requires_grad:
            bn_bwd.append(module.num_features)

    hooks = [m.register_forward_hook(on_bn) for m in method.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = (mocov3_module.all_gather_no_grad, batchformer_module.all_gather_grad)
    mocov3_module.all_gather_no_grad = recorder(keys, saved[0])
    batchformer_module.all_gather_grad = recorder(bf, saved[1])
    try:
        size = (local_batch, info.in_channels, info.image_size, info.image_size)
        views = [torch.randn(size), torch.randn(size)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"):
            loss = method(views, 1, 100)["loss"]
        loss.backward()
    finally:
        mocov3_module.all_gather_no_grad, batchformer_module.all_gather_grad = saved
        for hook in hooks:
            hook.remove()
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return Census(trainable, keys, bf, bn_fwd, bn_bwd)


def h200_round1() -> dict[str, dict[str, float]]:
    """{method: {"ms", "gflop"}} of the 'ours' rows (and '+ BatchFormer') of the round-1 H200 training-step table."""
    rows = {}
    for line in H200_LOG.read_text().splitlines():
        match = re.match(r"(simsiam|mocov3)\s+(ours(?: \+ BatchFormer)?)\s+([\d.]+)\s+([\d.]+)\s+.*\s([\d.]+)$", line)
        if match:
            rows[f"{match[1]} {match[2]}"] = {
                "ms": float(match[3]),
                "images_per_s": float(match[4]),
                "gflop": float(match[5]),
            }
    return rows


def step_seconds(c: Census, global_batch: int, gpus: int, gbps: float, hop_us: float, compute_s: float) -> dict:
    link = gbps * 1e9 / 8  # bytes per second
    grad = ring_allreduce_bytes(4 * c.trainable_params, gpus)
    keys = sum(allgather_bytes(rows * global_batch * width * nbytes, gpus) for rows, width, nbytes in c.key_gathers)
    bf = sum(2 * allgather_bytes(rows * global_batch * width * nbytes, gpus) for rows, width, nbytes in c.bf_gathers)
    bn = sum((gpus - 1) * (2 * ch + 1) * 4 for ch in c.bn_forward) + sum(
        ring_allreduce_bytes(2 * ch * 4, gpus) for ch in c.bn_backward
    )
    bn_latency = hop_us * 1e-6 * (len(c.bn_forward) * (gpus - 1) + len(c.bn_backward) * 2 * math.log2(gpus))
    seconds = {"grad": grad / link, "keys": keys / link, "bf_gather": bf / link, "sync_bn": bn / link + bn_latency}
    critical = seconds["keys"] + seconds["bf_gather"] + seconds["sync_bn"]
    return {
        "bytes": {"grad": grad, "keys": keys, "bf_gather": bf, "sync_bn": bn},
        "seconds": seconds,
        "sync_bn_latency_s": bn_latency,
        "compute_s": compute_s,
        "efficiency": compute_s / (max(compute_s, seconds["grad"]) + critical),
    }


def cases():
    """(name, config) of every ImageNet recipe, and of the BatchFormer ones with batchformer.gather=true."""
    from batchssl.config import load_config

    for name in RECIPES:
        path = REPO / "recipes" / "imagenet" / f"{name}.yaml"
        yield name, load_config(path)
        if name.endswith("_bf"):
            yield f"{name} gather", load_config(path, ["batchformer.gather=true"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results" / "comm_on_paper"),
        help="output path without suffix (.json and .md are written)",
    )
    parser.add_argument(
        "--hop-us",
        type=float,
        default=5.0,
        help="latency of one network hop of a collective, microseconds (InfiniBand: a few)",
    )
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(saved["rows"], saved["h200_round1"], saved["hop_us"]))
        return
    from flops import step_flops

    torch.set_num_threads(max(1, torch.get_num_threads()))
    h200 = h200_round1()
    results = []
    for name, cfg in cases():
        c = census(cfg)
        method = cfg.method.name
        rate = h200[f"{method} ours"]["gflop"] * 1e9 / (h200[f"{method} ours"]["ms"] * 1e-3)
        for gpus in GPUS:
            local = cfg.train.batch_size // gpus
            if local < 2:  # the trainer refuses it: batch norm needs 2 images per process (build.check_batch)
                results.append(
                    {
                        "case": name,
                        "global_batch": cfg.train.batch_size,
                        "gpus": gpus,
                        "per_gpu_batch": cfg.train.batch_size / gpus,
                        "refused": True,
                    }
                )
                continue
            per_gpu = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=local))
            flops, _ = step_flops(per_gpu)
            for gbps in LINKS_GBPS:
                row = step_seconds(c, cfg.train.batch_size, gpus, gbps, args.hop_us, flops / rate)
                results.append(
                    {
                        "case": name,
                        "global_batch": cfg.train.batch_size,
                        "gpus": gpus,
                        "per_gpu_batch": cfg.train.batch_size / gpus,
                        "link_gbps": gbps,
                        "step_gflop_per_gpu": flops / 1e9,
                        **row,
                    }
                )
        results[-1]["census"] = {
            "trainable_params": c.trainable_params,
            "key_gathers": c.key_gathers,
            "bf_gathers": c.bf_gathers,
            "bn_forward_calls": len(c.bn_forward),
            "bn_backward_calls": len(c.bn_backward),
            "bn_forward_channels": sum(c.bn_forward),
        }
        print(
            f"{name}: {c.trainable_params / 1e6:.1f} M trainable, {len(c.key_gathers)} key gathers, "
            f"{len(c.bf_gathers)} BF gathers, {len(c.bn_forward)} BN calls ({len(c.bn_backward)} with grad)",
            flush=True,
        )
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps({"hop_us": args.hop_us, "h200_round1": h200, "rows": results}, indent=1) + "\n"
    )
    out.with_suffix(".md").write_text(markdown(results, h200, args.hop_us))
    print(f"written {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(rows: list[dict], h200: dict, hop_us: float) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
    lines = [
        "Per GPU and step; MB sent or received, ms at the link rate (sync BN: + latency at "
        f"{hop_us:g} us per hop). Compute: estimated from FLOPs at the H200's round-1 rate "
        f"(SimSiam {h200['simsiam ours']['ms']} ms, MoCo v3 {h200['mocov3 ours']['ms']} ms for ResNet-18 CIFAR "
        "batch 512 there). Efficiency: compute / (max(compute, gradients) + keys + BF gather + sync BN).",
        "",
        "| case | GPUs | batch/GPU | link Gb/s | grad MB | keys MB | BF gather MB | sync BN MB | grad ms | keys ms "
        "| BF gather ms | sync BN ms | compute ms (est.) | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("refused"):
            lines.append(
                f"| {r['case']} | {r['gpus']} | {r['per_gpu_batch']:g} | refused by the trainer: batch norm "
                "needs 2 images per GPU |" + " |" * 10
            )
            continue
        b, s = r["bytes"], r["seconds"]
        lines.append(
            f"| {r['case']} | {r['gpus']} | {r['per_gpu_batch']:g} | {r['link_gbps']} | {mb(b['grad'])} | "
            f"{mb(b['keys'])} | {mb(b['bf_gather'])} | {mb(b['sync_bn'])} | {ms(s['grad'])} | "
            f"{ms(s['keys'])} | {ms(s['bf_gather'])} | {ms(s['sync_bn'])} | {ms(r['compute_s'])} | "
            f"{r['efficiency']:.2f} |"
        )
    return "\n".join(lines + findings(rows)) + "\n"


def findings(rows: list[dict]) -> list[str]:
    """Where communication limits scaling, read off the rows: the largest exposed cost of each row, and the worst
    share of compute each critical-path collective takes."""
    rows = [r for r in rows if not r.get("refused")]
    names = {"keys": "MoCo keys", "bf_gather": "BatchFormer gather", "sync_bn": "synced BN", "grad": "gradients"}

    def exposed(r):  # the gradients count only beyond the compute they overlap with
        s = r["seconds"]
        return {
            "grad": max(0.0, s["grad"] - r["compute_s"]),
            "keys": s["keys"],
            "bf_gather": s["bf_gather"],
            "sync_bn": s["sync_bn"],
        }

    out = ["", "Where communication limits scaling (from the rows above):", ""]
    for gpus in GPUS:
        at = [r for r in rows if r["gpus"] == gpus]
        tops = [max(exposed(r).items(), key=lambda kv: kv[1])[0] for r in at]
        counts = ", ".join(f"{names[k]} in {tops.count(k)}" for k in names if tops.count(k))
        effs = [r["efficiency"] for r in at]
        out.append(
            f"- {gpus} GPUs: largest exposed cost {counts} of {len(at)} rows; efficiency "
            f"{min(effs):.2f} to {max(effs):.2f}."
        )
    for key in ("bf_gather", "keys", "sync_bn"):
        worst = max(rows, key=lambda r: r["seconds"][key] / r["compute_s"])
        share = worst["seconds"][key] / worst["compute_s"]
        out.append(
            f"- {names[key]}: at most {share:.2f}x a step's compute ({worst['case']}, {worst['gpus']} GPUs, "
            f"{worst['link_gbps']} Gb/s: {worst['seconds'][key] * 1e3:.1f} ms against "
            f"{worst['compute_s'] * 1e3:.1f} ms)."
        )
    return out


if __name__ == "__main__":
    main()
