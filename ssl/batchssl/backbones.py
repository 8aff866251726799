"""Backbones that map images to one feature vector: ResNet-18/50 (CIFAR or ImageNet stem, width multiplier),
ViT (torchvision's VisionTransformer, class token), and any timm model (`model.arch=timm:<name>`).

The ResNet keeps torchvision's module names (conv1, bn1, layer1..4) so torchvision ResNet weights load into it
(minus `fc`), and reuses torchvision's BasicBlock / Bottleneck.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1
from torchvision.models.vision_transformer import VisionTransformer

from batchssl.config import ModelConfig

RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}
VITS = {  # hidden dim, depth, heads
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 12),  # MoCo v3's ViT-S: 12 heads, not DeiT's 6 (the paper found it better)
    "vit_base": (768, 12, 12),
}


class ResNet(nn.Module):
    def __init__(self, block, layers: list[int], width: float = 1.0, in_channels: int = 3, cifar_stem: bool = False):
        super().__init__()
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if cifar_stem:  # 3x3 stride-1 conv, no max-pool: keeps 32 px images at full resolution in layer1
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3] * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ViT(nn.Module):
    """torchvision VisionTransformer without its classification head; returns the class token."""

    def __init__(self, image_size: int, patch_size: int, hidden: int, depth: int, heads: int, in_channels: int):
        super().__init__()
        self.vit = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=depth,
            num_heads=heads,
            hidden_dim=hidden,
            mlp_dim=4 * hidden,
        )
        if in_channels != 3:
            self.vit.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
        self.vit.heads = nn.Identity()
        self.feature_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


def build_timm(name: str, cfg: ModelConfig, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """timm.create_model(name, pretrained=False, num_classes=0, in_chans=C): the model itself, not wrapped, so that
    its state dict is timm's and the exported weights load into timm.create_model(name, num_classes=0, in_chans=C
    [, img_size=S]) as they are. Models with a fixed input size (ViTs, Swin, ...) are rebuilt for the data's size
    (and model.patch_size when set), as timm's own img_size argument does."""
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    fixed = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if fixed is not None and (tuple(fixed) != (image_size, image_size) or cfg.patch_size):
        extra = {"patch_size": cfg.patch_size} if cfg.patch_size else {}
        net = timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_channels, img_size=image_size, **extra
        )
    # head_hidden_size: models whose pooled features pass a pre-logits layer of another width (timm >= 0.9)
    return net, getattr(net, "head_hidden_size", None) or net.num_features


def channels_last_arch(arch: str) -> bool:
    """Whether the architecture runs in channels_last when train.channels_last is on: ResNets and timm models
    (timm's own training script applies it to every model; a ViT's patch embedding is a convolution too)."""
    return arch.startswith(("resnet", "timm:"))


def build_backbone(cfg: ModelConfig, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """(backbone, feature dimension)."""
    if cfg.arch.startswith("timm:"):
        return build_timm(cfg.arch.removeprefix("timm:"), cfg, in_channels, image_size)
    if cfg.arch in RESNETS:
        block, layers = RESNETS[cfg.arch]
        cifar_stem = cfg.stem == "cifar" or (cfg.stem == "auto" and image_size < 64)
        net = ResNet(block, layers, cfg.width, in_channels, cifar_stem)
    else:
        hidden, depth, heads = VITS[cfg.arch]
        patch = cfg.patch_size or (4 if image_size < 64 else 16)
        net = ViT(image_size, patch, hidden, depth, heads, in_channels)
        if cfg.freeze_patch_embed:  # MoCo v3: a fixed random patch projection stabilises ViT training
            net.vit.conv_proj.requires_grad_(False)
    return net, net.feature_dim
