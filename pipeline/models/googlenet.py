"""GoogLeNet / Inception v1 (Szegedy et al., 2014) with its two auxiliary classifiers.

Structure and names follow torchvision's GoogLeNet, not the tutorial's, where
the two differ, so that torchvision's ImageNet state_dict loads strictly:

- ``BasicConv2d`` is conv (no bias) -> BatchNorm (eps 0.001) -> ReLU; the
  tutorial's has no BatchNorm.
- The "5x5" branch uses a 3x3 kernel, as torchvision's weights do (pass
  ``branch3_kernel=5`` for the paper's 5x5; such a model then cannot take
  torchvision's weights).
- The auxiliary heads pool adaptively to 4x4 instead of a fixed 5x5/3 average
  pool, so their flatten is 128 * 4 * 4 = 2048 wide at every input size (at
  224 px both give 4x4; the pooling windows differ slightly).

torchvision's weights expect input normalised with mean = std = 0.5 (torchvision
re-normalises inside the model with ``transform_input``; this model does not),
hence that ``pretrained_cfg`` mean/std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.models.registry import ClassifierBase, classifier_layer, make_cfg, register_model

# name: (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj): the paper's Table 1.
INCEPTION_TABLE = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}
# Trunk modules in forward order; the max pools' ceil_mode matches the paper's sizes.
TRUNK = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b",
         "maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e",
         "maxpool4", "inception5a", "inception5b")
AUX_TAPS = {"inception4a": "aux1", "inception4d": "aux2"}  # trunk output -> aux head
AUX_LOSS_WEIGHTS = (0.3, 0.3)
AUX_WIDTH, AUX_GRID = 128, 4  # aux 1x1 conv channels and pooled grid: 128 * 4 * 4 = 2048


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=0.001) -> ReLU, named ``conv`` and ``bn`` as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1->3x3 | 1x1->kxk | pool->1x1."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int, branch3_kernel: int = 3) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, 1),
                                     BasicConv2d(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, 1),
                                     BasicConv2d(ch5x5red, ch5x5, branch3_kernel,
                                                 padding=branch3_kernel // 2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, 1))

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([branch(x) for branch in branches], dim=1)


class InceptionAux(nn.Module):
    """pool to 4x4 -> 1x1 conv to 128 -> flatten (2048) -> dropout -> fc 1024 + ReLU
    -> dropout -> fc2 (classes)."""

    def __init__(self, in_channels: int, num_classes: int, drop_rate: float = 0.5) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(AUX_GRID)
        self.conv = BasicConv2d(in_channels, AUX_WIDTH, 1)
        self.fc1 = nn.Linear(AUX_WIDTH * AUX_GRID * AUX_GRID, 1024)
        self.fc2 = classifier_layer(1024, num_classes)
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)  # (B, 2048)
        x = F.dropout(x, self.drop_rate, self.training)
        x = F.relu(self.fc1(x), inplace=True)
        x = F.dropout(x, self.drop_rate, self.training)
        return self.fc2(x)


class GoogLeNet(ClassifierBase):
    """Inception v1. In training mode ``forward`` returns ``(logits, [aux1, aux2])``
    (combine them with ``compute_loss`` and ``aux_loss_weights``); in eval mode, logits."""

    def __init__(self, num_classes: int = 1000, *, pretrained_cfg: dict, in_chans: int = 3,
                 drop_rate: float = 0.4, aux_drop_rate: float = 0.5,
                 branch3_kernel: int = 3) -> None:
        super().__init__()
        self.pretrained_cfg = pretrained_cfg
        self.aux_loss_weights = AUX_LOSS_WEIGHTS
        self.conv1 = BasicConv2d(in_chans, 64, 7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        for name, channels in INCEPTION_TABLE.items():
            setattr(self, name, Inception(*channels, branch3_kernel=branch3_kernel))
        self.aux1 = InceptionAux(INCEPTION_TABLE["inception4b"][0], num_classes, aux_drop_rate)
        self.aux2 = InceptionAux(INCEPTION_TABLE["inception4e"][0], num_classes, aux_drop_rate)
        self._init_head(1024, num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _trunk(self, x: Tensor, with_aux: bool) -> tuple[Tensor, list[Tensor]]:
        aux_logits = []
        for name in TRUNK:
            x = getattr(self, name)(x)
            if with_aux and name in AUX_TAPS:
                aux_logits.append(getattr(self, AUX_TAPS[name])(x))
        return x, aux_logits

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, 1024, H/32, W/32), the output of inception5b."""
        return self._trunk(x, with_aux=False)[0]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:
        if not self.training:
            return super().forward(x)
        features, aux_logits = self._trunk(x, with_aux=True)
        return self.forward_head(features), aux_logits

    def reset_classifier(self, num_classes: int) -> None:
        """New main and auxiliary classifiers, so all three outputs have ``num_classes``."""
        super().reset_classifier(num_classes)
        self.aux1.fc2 = classifier_layer(1024, num_classes)
        self.aux2.fc2 = classifier_layer(1024, num_classes)


@register_model
def googlenet(num_classes: int = 1000, *, zero_init_residual: bool = False,
              **kw: object) -> GoogLeNet:
    """GoogLeNet with aux heads; 13.0 M parameters at 1000 classes (6.6 M without the aux heads)."""
    if zero_init_residual:
        raise PipelineError("googlenet has no residual blocks; drop zero_init_residual for it")
    cfg = make_cfg("googlenet", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="conv1.conv",
                   aux_classifiers=("aux1.fc2", "aux2.fc2"), tv_weights="GoogLeNet_Weights")
    return GoogLeNet(num_classes, pretrained_cfg=cfg, **kw)
