"""ResNet (He et al., 2015) with torchvision's module names, and the 32x32 CIFAR variant.

Module and parameter names (conv1, bn1, layer1..4, fc; blocks' conv1/bn1/...,
downsample.0/.1) and shapes are those of torchvision's ResNet, so its ImageNet
state_dicts load strictly. As in torchvision ("ResNet v1.5") a Bottleneck
strides in its 3x3 conv, not in the first 1x1.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.models.registry import ClassifierBase, make_cfg, register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 conv without bias (the BN after it has one); padding keeps the size at stride 1."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, dilation=dilation, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 conv without bias: channel projection (and striding, in shortcuts)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Output channels = planes."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1) -> None:
        super().__init__()
        if groups != 1 or base_width != 64 or dilation != 1:
            raise PipelineError("BasicBlock (resnet18/34) supports only groups=1, "
                                "width_per_group=64 and no dilation; use a Bottleneck ResNet")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Start the residual branch at 0 so the block begins as the identity."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided, grouped) -> 1x1 expand (ResNet-50/101/152, ResNeXt).

    Output channels = planes * 4.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups  # ResNeXt widens the 3x3 conv
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        """Start the residual branch at 0 so the block begins as the identity."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(ClassifierBase):
    """Stem -> four stages (64/128/256/512 planes) -> global average pool -> dropout -> fc.

    ``cifar_stem`` swaps the 7x7/2 conv + 3x3/2 max pool for one 3x3/1 conv, so
    a 32x32 image reaches layer4 at 4x4 instead of 1x1.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, *,
                 pretrained_cfg: dict, in_chans: int = 3, cifar_stem: bool = False,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if len(replace_stride_with_dilation) != 3:
            raise PipelineError("replace_stride_with_dilation needs 3 booleans (layer2..4), "
                                f"got {replace_stride_with_dilation!r}")
        self.pretrained_cfg = pretrained_cfg
        self.inplanes, self.dilation = 64, 1  # updated by _make_layer as stages are added
        self.groups, self.base_width = groups, width_per_group
        self._init_stem(in_chans, cifar_stem)
        self.layer1 = self._make_layer(block, 64, layers[0])
        for index, (planes, dilate) in enumerate(zip((128, 256, 512), replace_stride_with_dilation)):
            stage = self._make_layer(block, planes, layers[index + 1], stride=2, dilate=dilate)
            setattr(self, f"layer{index + 2}", stage)
        self._init_head(512 * block.expansion, num_classes, drop_rate)
        self._init_weights(zero_init_residual)

    def _init_stem(self, in_chans: int, cifar_stem: bool) -> None:
        if cifar_stem:
            self.conv1 = conv3x3(in_chans, 64)
            self.maxpool = nn.Identity()  # 32 px is too small to lose 3/4 of it this early
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        """One stage: a first block that may stride/project, then ``blocks - 1`` plain ones."""
        first_dilation = self.dilation
        if dilate:  # keep the resolution, grow the receptive field instead
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        shape = {"groups": self.groups, "base_width": self.base_width}
        stage = [block(self.inplanes, planes, stride, downsample, dilation=first_dilation, **shape)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, dilation=self.dilation, **shape)
                  for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:  # after the loop above, which sets every BN weight to 1
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    module.zero_init_last()

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H/32, W/32) (H/8 for the CIFAR stem)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _resnet(name: str, block: Block, layers: Sequence[int], num_classes: int,
            tv_weights: str | None = None, cifar: bool = False, **kw: object) -> ResNet:
    if cifar:
        cfg = make_cfg(name, input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD,
                       crop_pct=1.0, num_classes=10)
    else:
        cfg = make_cfg(name, tv_weights=tv_weights)
    return ResNet(block, layers, num_classes, pretrained_cfg=cfg, cifar_stem=cifar, **kw)


@register_model
def resnet18_cifar(num_classes: int = 10, **kw: object) -> ResNet:
    """ResNet-18 for 32x32 input: 3x3/1 stem, no max pool (d2l's Kaggle CIFAR-10 model)."""
    return _resnet("resnet18_cifar", BasicBlock, (2, 2, 2, 2), num_classes, cifar=True, **kw)


@register_model
def resnet34_cifar(num_classes: int = 10, **kw: object) -> ResNet:
    """ResNet-34 for 32x32 input: 3x3/1 stem, no max pool."""
    return _resnet("resnet34_cifar", BasicBlock, (3, 4, 6, 3), num_classes, cifar=True, **kw)


@register_model
def resnet18(num_classes: int = 1000, **kw: object) -> ResNet:
    """ResNet-18: BasicBlock stages [2, 2, 2, 2]; 11.7 M parameters at 1000 classes."""
    return _resnet("resnet18", BasicBlock, (2, 2, 2, 2), num_classes, "ResNet18_Weights", **kw)


@register_model
def resnet34(num_classes: int = 1000, **kw: object) -> ResNet:
    """ResNet-34: BasicBlock stages [3, 4, 6, 3]; 21.8 M parameters at 1000 classes."""
    return _resnet("resnet34", BasicBlock, (3, 4, 6, 3), num_classes, "ResNet34_Weights", **kw)


@register_model
def resnet50(num_classes: int = 1000, **kw: object) -> ResNet:
    """ResNet-50: Bottleneck stages [3, 4, 6, 3]; 25,557,032 parameters at 1000 classes."""
    return _resnet("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, "ResNet50_Weights", **kw)


@register_model
def resnet101(num_classes: int = 1000, **kw: object) -> ResNet:
    """ResNet-101: Bottleneck stages [3, 4, 23, 3]; 44.5 M parameters at 1000 classes."""
    return _resnet("resnet101", Bottleneck, (3, 4, 23, 3), num_classes, "ResNet101_Weights", **kw)


@register_model
def resnet152(num_classes: int = 1000, **kw: object) -> ResNet:
    """ResNet-152: Bottleneck stages [3, 8, 36, 3]; 60.2 M parameters at 1000 classes."""
    return _resnet("resnet152", Bottleneck, (3, 8, 36, 3), num_classes, "ResNet152_Weights", **kw)
