"""Run directory: config.yaml, metrics.jsonl, checkpoints/epoch_NNNN/ (Accelerate save_state), backbone.safetensors.

A checkpoint is written to checkpoints/.tmp-epoch_NNNN and renamed when complete; only renamed directories that
hold trainer_state.json count, so a half-written checkpoint is never loaded and the previous one stays the newest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from batchssl.config import Config
from batchssl.errors import UserError

STATE_FILE = "trainer_state.json"
BACKBONE_FILE = "backbone.safetensors"
_CHECKPOINT = re.compile(r"^epoch_(\d+)$")


def model_signature(cfg: Config) -> dict:
    """What must match for a checkpoint's weights to fit this run's model."""
    return {
        "dataset": cfg.data.name,
        "arch": cfg.model.arch, "width": cfg.model.width, "stem": cfg.model.stem, "patch_size": cfg.model.patch_size,
        "method": cfg.method.name, "proj_hidden_dim": cfg.method.proj_hidden_dim, "proj_dim": cfg.method.proj_dim,
        "proj_layers": cfg.method.proj_layers, "pred_hidden_dim": cfg.method.pred_hidden_dim,
        "batchformer": cfg.batchformer.enabled, "batchformer_position": cfg.batchformer.position,
        "batchformer_nhead": cfg.batchformer.nhead,
    }


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, keep_last: int) -> Path:
    """Collective: every process calls it. Returns the final directory."""
    root = checkpoint_dir(output_dir)
    final = root / f"epoch_{state['epoch']:04d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():  # an earlier run's checkpoint of the same epoch (e.g. resume=<older checkpoint>)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is incomplete or unreadable ({err})") from None


def load_checkpoint(accelerator, path: Path, cfg: Config) -> dict:
    """Restore model, optimizer, scaler and RNG states; refuse a checkpoint of another model."""
    state = read_state(path)
    theirs, ours = state.get("model_signature", {}), model_signature(cfg)
    diff = [f"{k}: checkpoint {theirs.get(k)!r} vs run {v!r}" for k, v in ours.items() if theirs.get(k) != v]
    if diff:
        raise UserError(f"checkpoint {path} was written for another model ({'; '.join(diff)}): use another "
                        "output_dir or checkpoint.resume=none with a fresh output_dir")
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, SafetensorError, OSError, KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} cannot be loaded into this model: {first}") from None
    return state


def export_backbone(backbone: nn.Module, path: str | Path) -> None:
    """Frozen-backbone weights (no heads, no BatchFormer), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def load_backbone_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True (never unpickles code).
    Accepts torchvision-style checkpoints: a nested 'state_dict'/'model' entry, a 'module.' prefix, an `fc` head."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure of a user-supplied file is bad input
        raise UserError(f"cannot read backbone weights {path}: {str(err).splitlines()[0]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    return state


def load_backbone(backbone: nn.Module, path: str | Path) -> nn.Module:
    state = load_backbone_weights(path)
    expected = backbone.state_dict().keys()
    if all(k.startswith("vit.") for k in expected) and not any(k.startswith("vit.") for k in state):
        # torchvision VisionTransformer weights: ours wraps it as `vit` and has no classification head
        state = {f"vit.{k}": v for k, v in state.items() if not k.startswith("heads.")}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"weights in {path} do not match the architecture: {detail}") from None
    return backbone
