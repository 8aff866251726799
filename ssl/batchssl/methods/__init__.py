"""Method registry: the training loop builds a method by name and knows nothing else about it."""

from torch import nn

from batchssl.config import Config
from batchssl.methods.barlowtwins import BarlowTwins
from batchssl.methods.base import SSLMethod
from batchssl.methods.byol import BYOL
from batchssl.methods.dino import DINO
from batchssl.methods.mocov3 import MoCoV3
from batchssl.methods.simclr import SimCLR
from batchssl.methods.simsiam import SimSiam
from batchssl.methods.vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {
    "simsiam": SimSiam,
    "mocov3": MoCoV3,
    "byol": BYOL,
    "simclr": SimCLR,
    "barlowtwins": BarlowTwins,
    "vicreg": VICReg,
    "dino": DINO,
}


def build_method(cfg: Config, backbone: nn.Module, feature_dim: int) -> SSLMethod:
    cls = METHODS[cfg.method.name]
    # Methods whose schedules are set in epochs (DINO's teacher temperature) convert them with train.epochs.
    extra = {"epochs": cfg.train.epochs} if getattr(cls, "schedules_in_epochs", False) else {}
    return cls(backbone, feature_dim, cfg.method, cfg.batchformer, **extra)
