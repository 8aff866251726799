"""Method registry: the training loop builds a method by name and knows nothing else about it."""

from torch import nn

from batchssl.config import Config
from batchssl.methods.base import SSLMethod
from batchssl.methods.mocov3 import MoCoV3
from batchssl.methods.simsiam import SimSiam

METHODS: dict[str, type[SSLMethod]] = {"simsiam": SimSiam, "mocov3": MoCoV3}


def build_method(cfg: Config, backbone: nn.Module, feature_dim: int) -> SSLMethod:
    return METHODS[cfg.method.name](backbone, feature_dim, cfg.method, cfg.batchformer)
