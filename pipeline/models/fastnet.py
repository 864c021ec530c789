"""FastNet: a small all-conv BN network for small images, built for speed.

After the published CIFAR-10 speed-run ideas (Page's ResNet-9 style networks,
hlb-CIFAR10, airbench): a 3x3 stem, then three groups of conv -> max-pool ->
BN -> GELU -> conv -> BN -> GELU that halve the resolution, then global max
pooling and a linear classifier whose output is scaled down (a temperature
that keeps early logits small). ``whiten_stem`` can set the stem from image
statistics (a PCA-whitening first layer).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.models.registry import ClassifierBase, make_cfg, register_model
from pipeline.models.resnet import CIFAR10_MEAN, CIFAR10_STD


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 conv (no bias: BN follows) -> BN -> GELU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class ConvGroup(nn.Sequential):
    """conv -> maxpool(2) -> BN -> GELU -> conv -> BN -> GELU; halves H and W."""

    def __init__(self, c_in: int, c_out: int):
        first = conv_bn(c_in, c_out)
        super().__init__(first[0], nn.MaxPool2d(2), *first[1:], *conv_bn(c_out, c_out))


class FastNet(ClassifierBase):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 256, 256), stem_width: int = 32,
                 in_chans: int = 3, drop_rate: float = 0.0, logit_scale: float = 1 / 9):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_chans, stem_width))
        groups, c = [], stem_width
        for w in widths:
            groups.append(ConvGroup(c, w))
            c = w
        self.groups = nn.Sequential(*groups)
        self.logit_scale = logit_scale
        self._init_head(c, num_classes, drop_rate)
        self.avgpool = nn.AdaptiveMaxPool2d(1)  # max pooling suits these small maps
        self.pretrained_cfg = make_cfg("fastnet", input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD,
                                       first_conv="stem.0")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.groups(self.stem(x))  # (B, C, H/8, W/8)

    def init_from_data(self, images: Tensor) -> None:
        """Whiten the stem from a batch of normalised training images (B, C, H, W)."""
        whiten_stem(self, images)

    def logits_from_pooled(self, x: Tensor) -> Tensor:
        return super().logits_from_pooled(x) * self.logit_scale


@torch.no_grad()
def whiten_stem(model: FastNet, images: Tensor, eps: float = 5e-4) -> None:
    """Set the stem conv to PCA-whiten 3x3 patches of ``images`` (B, C, H, W).

    The first half of the filters are the whitening directions, the second half
    their negatives (so the GELU passes both signs).
    """
    conv = model.stem[0]
    k = conv.kernel_size[0]
    patches = images.unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k).double()
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    eigval, eigvec = torch.linalg.eigh(cov)
    filters = (eigvec.T / (eigval + eps).sqrt()[:, None]).flip(0)  # strongest first
    half = conv.out_channels // 2
    w = filters[:half].reshape(half, images.shape[1], k, k).float()
    conv.weight.copy_(torch.cat([w, -w])[: conv.out_channels])


@register_model
def fastnet(num_classes: int = 10, **kw) -> FastNet:
    """FastNet at the widths of the CIFAR-10 speed runs (64, 256, 256); about 2M parameters."""
    return FastNet(num_classes, widths=(64, 256, 256), stem_width=32, **kw)


@register_model
def fastnet_s(num_classes: int = 10, **kw) -> FastNet:
    """A narrow FastNet (16, 32, 64) for tiny images and CPU demos."""
    return FastNet(num_classes, widths=(16, 32, 64), stem_width=16, **kw)
