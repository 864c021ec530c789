"""New classifier heads start calibrated: uniform predictions, log loss ln C (issue 13.4)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import create_model, load_weights
from pipeline.models import timm_models
from pipeline.models.heads import build_head, final_layer
from pipeline.models.timm_models import create_timm_model

# One model per family; the timm ones are built with pretrained=False.
FAMILIES = ["resnet18_cifar", "resnet50", "googlenet", "fastnet_s", "timm:resnet18", "timm:mobilenetv3_small_050"]


def random_label_loss(logits: torch.Tensor, num_classes: int, seed: int = 0) -> float:
    """Mean cross-entropy of ``logits`` against uniformly random labels."""
    labels = torch.randint(0, num_classes, (len(logits),), generator=torch.Generator().manual_seed(seed))
    return nn.functional.cross_entropy(logits, labels).item()


def px(name: str) -> int:
    return 32 if name.endswith("_cifar") or name.startswith("fastnet") else 64


# mlp once per route (our registry, timm): googlenet and fastnet share resnet's path.
CASES = [(name, "linear") for name in FAMILIES] + [(name, "mlp") for name in FAMILIES
                                                   if name not in ("googlenet", "fastnet_s")]


@pytest.mark.parametrize("num_classes", [10, 120])
@pytest.mark.parametrize("name, head", CASES)
def test_new_head_predicts_uniformly(name: str, head: str, num_classes: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model(name, num_classes + 3)  # a backbone trained on other classes
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model = create_model(name, num_classes, head=head, weights=tmp_path / "backbone.pth")
    x = torch.randn(8, 3, px(name), px(name)) * 2  # off-scale input, as a new data set may be
    model.train()  # googlenet's aux heads answer only in training mode
    with torch.no_grad():
        output = model(x)
    outputs = [output[0], *output[1]] if isinstance(output, tuple) else [output]
    assert len(outputs) == (3 if name == "googlenet" else 1)
    for logits in outputs:
        assert logits.shape == (8, num_classes)
        assert abs(random_label_loss(logits, num_classes) - math.log(num_classes)) < 0.05


def test_head_that_does_not_fit_the_weights_restarts_at_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("resnet18_cifar", 10)
    nn.init.normal_(source.fc.weight)  # a trained head: large, not zero
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)

    fits = create_model("resnet18_cifar", 10, weights=path)
    torch.testing.assert_close(fits.fc.weight, source.fc.weight)  # loaded heads are kept

    other = create_model("resnet18_cifar", 5)
    nn.init.normal_(other.fc.weight)  # as a library's large init would leave it
    nn.init.normal_(other.fc.bias)
    report = load_weights(other, path)
    assert sorted(report.random) == ["fc.bias", "fc.weight"]
    assert not other.fc.weight.any() and not other.fc.bias.any()
    torch.testing.assert_close(other.conv1.weight, source.conv1.weight)


def test_mlp_head_keeps_hidden_init_and_zeroes_only_the_final_layer(tmp_path: Path) -> None:
    head = build_head("mlp", 32, 7, hidden=16, drop_rate=0.1)
    name, last = final_layer(head)
    assert name == "3" and last is head[3]
    assert head[3].weight.std() > 0.01  # from scratch: the default init, so the first steps learn
    torch.save(create_model("resnet18_cifar", 10).state_dict(), tmp_path / "w.pth")
    model = create_model("resnet18_cifar", 7, head="mlp", head_hidden=16, weights=tmp_path / "w.pth")
    assert not model.fc[3].weight.any() and not model.fc[3].bias.any()  # on weights: zero start
    assert model.fc[0].weight.std() > 0.01  # the hidden layer is a normal random init
    assert isinstance(build_head("linear", 32, 0), nn.Identity)


class _FakeTimm(nn.Module):
    """Stands in for a timm model whose classifier came from pretrained weights."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(4, num_classes)
        nn.init.ones_(self.fc.weight)
        self.pretrained_cfg = {"classifier": "fc", "num_classes": 1000}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes, self.fc = num_classes, nn.Linear(4, num_classes)


@pytest.mark.parametrize("num_classes, kept", [(1000, True), (10, False)])
def test_timm_pretrained_head_is_kept_only_when_it_was_loaded(monkeypatch: pytest.MonkeyPatch,
                                                              num_classes: int, kept: bool) -> None:
    monkeypatch.setattr(timm_models.timm, "create_model",
                        lambda name, pretrained, **kw: _FakeTimm(kw.get("num_classes", 1000)))
    model = create_timm_model("resnet18", num_classes, pretrained=True)
    assert bool(model.fc.weight.any()) is kept
    assert model.fc.out_features == num_classes
    # a replaced pretrained classifier is kept aside, as the class prior's source (tests/test_class_prior.py)
    assert hasattr(model, "pretrained_head") is not kept


def class_clustered_features(n: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled-feature look-alikes: non-negative, norm ~ 30 like a CNN's, one mean per class."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_classes, dim, generator=gen) * 2
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    feats = (centres[labels] + 0.5 * torch.randn(n, dim, generator=gen)).clamp_min(0)
    return feats, labels


@pytest.mark.parametrize("num_classes", [10, 120])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_on_cached_features_starts_at_ln_c_and_learns(kind: str, num_classes: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    feats, labels = class_clustered_features(2000, 512, num_classes, seed=1)
    torch.save(create_model("resnet18_cifar", 1000).state_dict(), tmp_path / "backbone.pth")
    # the head a frozen-backbone run attaches to weights, trained as on the feature cache
    head = create_model("resnet18_cifar", num_classes, head=kind, head_hidden=128, weights=tmp_path / "backbone.pth").fc
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for batch in torch.randperm(len(feats)).split(64):  # one epoch
        loss = nn.functional.cross_entropy(head(feats[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(num_classes)) < 0.05
    assert sum(losses[-5:]) / 5 < 0.8 * math.log(num_classes)  # the zero start does not stall training
