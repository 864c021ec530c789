"""Tests of the model zoo: every registered model plus a small timm one, weights, heads."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.error import URLError

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import (
    compute_loss,
    create_model,
    freeze_backbone,
    list_models,
    load_weights,
    model_data_config,
    param_groups,
    register_model,
    set_train_mode,
)
from pipeline.models.resnet import resnet50

SHARED = Path(__file__).resolve().parents[2] / "shared"
LITE0 = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"
SMALL_TIMM = "timm:mobilenetv3_small_050"  # 1.6 M params; its classifier is wider than num_features
GOOGLENET_HEADS = {f"{head}.{kind}" for head in ("fc", "aux1.fc2", "aux2.fc2") for kind in ("weight", "bias")}


def input_px(name: str) -> int:
    return 32 if name.endswith("_cifar") else 64


def torchvision_model(name: str) -> nn.Module:
    """torchvision's randomly initialised counterpart of one of our models."""
    if name == "googlenet":
        return torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    return getattr(torchvision.models, name)(weights=None)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tv_googlenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "googlenet.pth"
    torch.save(torchvision_model("googlenet").state_dict(), path)
    return path


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("name", [*list_models(), SMALL_TIMM])
def test_forward_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    px = input_px(name)
    x, target = torch.randn(2, 3, px, px), torch.tensor([0, 2])
    model.train()
    output = model(x)
    loss = compute_loss(output, target, nn.functional.cross_entropy,
                        getattr(model, "aux_loss_weights", ()))
    loss.backward()
    logits = output[0] if isinstance(output, tuple) else output
    assert logits.shape == (2, 3)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", [*list_models(), SMALL_TIMM])
def test_timm_style_surface(name: str) -> None:
    model = create_model(name, num_classes=4).eval()
    px = input_px(name)
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, px, px))
        pooled = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    assert features.ndim == 4
    assert pooled.shape == (2, model.get_classifier().in_features)
    assert logits.shape == (2, 4)
    cfg = model.pretrained_cfg
    assert {"classifier", "input_size", "mean", "std", "interpolation"} <= set(cfg)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    model.reset_classifier(6)
    assert model.get_classifier().out_features == 6
    if not name.startswith("timm:"):
        assert features.shape[1] == model.num_features == pooled.shape[1]


@pytest.mark.parametrize("name", ["resnet18_cifar", "googlenet", SMALL_TIMM])
def test_in_chans_changes_the_first_conv(name: str) -> None:
    model = create_model(name, 2, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2)


def test_data_configs_of_our_models() -> None:
    cifar = model_data_config(create_model("resnet18_cifar", 10), pretrained=False)
    assert cifar["input_size"] == (3, 32, 32)
    assert cifar["mean"] == (0.4914, 0.4822, 0.4465)
    assert cifar["std"] == (0.2470, 0.2435, 0.2616)
    imagenet = model_data_config(create_model("resnet34", 10), pretrained=True)
    assert imagenet["input_size"] == (3, 224, 224)
    assert imagenet["mean"] == (0.485, 0.456, 0.406)


# ---------------------------------------------------------------- torchvision compatibility


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "googlenet"])
def test_parameter_count_equals_torchvision(name: str) -> None:
    assert count(create_model(name, 1000)) == count(torchvision_model(name))


def test_resnet50_parameter_count() -> None:
    assert count(create_model("resnet50", 1000)) == 25_557_032


def test_resnext_and_dilation_options() -> None:
    resnext = resnet50(groups=32, width_per_group=4)
    assert count(resnext) == count(torchvision.models.resnext50_32x4d(weights=None))
    dilated = resnet50(num_classes=2, replace_stride_with_dilation=(False, True, True))
    assert dilated.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 8, 8)


@pytest.mark.parametrize("name", [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "googlenet",
])
def test_torchvision_state_dict_loads_strictly(name: str) -> None:
    reference = torchvision_model(name).eval()
    model = create_model(name, 1000).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_googlenet_keeps_trunk_and_drops_heads_of_torchvision_weights(tv_googlenet_file: Path) -> None:
    reference = torch.load(tv_googlenet_file, weights_only=True)
    model = create_model("googlenet", 5)
    report = load_weights(model, tv_googlenet_file)
    assert set(report.dropped) == GOOGLENET_HEADS
    assert set(report.random) == GOOGLENET_HEADS
    assert set(report.loaded) == set(reference) - GOOGLENET_HEADS
    torch.testing.assert_close(model.conv1.conv.weight, reference["conv1.conv.weight"])
    torch.testing.assert_close(model.aux2.fc1.weight, reference["aux2.fc1.weight"])
    assert model.fc.weight.shape == model.aux1.fc2.weight.shape == (5, 1024)
    assert "1000 classes, model has 5" in report.summary()


# ---------------------------------------------------------------- auxiliary heads


@pytest.mark.parametrize("px", [64, 224])
def test_googlenet_aux_outputs_and_loss(px: int) -> None:
    model = create_model("googlenet", 5).train()
    x, target = torch.randn(2, 3, px, px), torch.tensor([1, 4])
    output = model(x)
    logits, (aux1, aux2) = output
    assert logits.shape == aux1.shape == aux2.shape == (2, 5)
    ce = nn.functional.cross_entropy
    expected = ce(logits, target) + 0.3 * ce(aux1, target) + 0.3 * ce(aux2, target)
    assert model.aux_loss_weights == (0.3, 0.3)
    torch.testing.assert_close(compute_loss(output, target, ce, model.aux_loss_weights), expected)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)


def test_compute_loss_rejects_missing_aux_weights() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="aux_loss_weights"):
        compute_loss((logits, [logits]), torch.tensor([0, 1]), nn.functional.cross_entropy)


# ---------------------------------------------------------------- real weights, freezing


@pytest.mark.skipif(not LITE0.is_file(), reason=f"{LITE0} absent (needs ../shared/weights)")
def test_efficientnet_lite0_weights_freeze_and_one_step(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline")
    model = create_model("timm:tf_efficientnet_lite0", 120, weights=LITE0)
    assert "dropped 2 (classifier.bias, classifier.weight: 1000 classes, model has 120)" in caplog.text
    report = load_weights(model, LITE0)
    assert sorted(report.dropped) == sorted(report.random) == ["classifier.bias", "classifier.weight"]
    file_state = safetensors.torch.load_file(LITE0)
    assert len(report.loaded) == len(file_state) - 2
    torch.testing.assert_close(model.conv_stem.weight, file_state["conv_stem.weight"])
    assert model_data_config(model, pretrained=True)["mean"] == (0.5, 0.5, 0.5)

    head = freeze_backbone(model)
    assert {id(p) for p in head} == {id(p) for p in model.classifier.parameters()}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model, True)
    optimizer = torch.optim.SGD(head, lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 5, 9, 119]))
    loss.backward()
    optimizer.step()
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == ["classifier.bias", "classifier.weight"]  # BN running stats included


def test_set_train_mode_without_freezing_trains_everything() -> None:
    model = create_model("resnet18_cifar", 10)
    set_train_mode(model, True)
    assert all(module.training for module in model.modules())
    set_train_mode(model, False)
    assert not any(module.training for module in model.modules())


def test_frozen_googlenet_trains_all_three_classifiers() -> None:
    model = create_model("googlenet", 5)
    trainable = freeze_backbone(model)
    assert len(trainable) == 6
    set_train_mode(nn.DataParallel(model), True)  # wrappers are seen through
    assert model.training and model.aux1.training and not model.conv1.bn.training
    groups = param_groups(nn.DataParallel(model), lr=0.1, weight_decay=0.0)
    assert sum(len(g["params"]) for g in groups) == 6


# ---------------------------------------------------------------- heads and optimizer groups


def test_mlp_head_on_our_model_and_timm() -> None:
    for name, width in [("resnet18", 512), (SMALL_TIMM, 1024)]:
        model = create_model(name, 7, head="mlp", head_hidden=256, drop_rate=0.2)
        head = model.get_classifier()
        assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
        assert (head[0].in_features, head[0].out_features) == (width, 256)
        assert (head[3].in_features, head[3].out_features) == (256, 7)
        assert head[2].p == 0.2
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_unknown_head_lists_choices() -> None:
    with pytest.raises(PipelineError, match="linear, mlp"):
        create_model("resnet18", 2, head="transformer")


def test_param_groups_split_decay_and_scale_backbone_lr() -> None:
    model = create_model("resnet18", 5)
    groups = param_groups(model, lr=0.1, weight_decay=5e-4, backbone_lr_scale=0.1)
    head_ids = {id(p) for p in model.fc.parameters()}
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters())
    for group in groups:
        params = group["params"]
        assert group["base_lr"] == group["lr"]
        assert group["weight_decay"] == (0.0 if params[0].ndim <= 1 else 5e-4)
        assert all((p.ndim <= 1) == (params[0].ndim <= 1) for p in params)
        is_head = {id(p) in head_ids for p in params}
        assert len(is_head) == 1
        assert group["lr"] == pytest.approx(0.1 if is_head.pop() else 0.01)
    assert model.bn1.weight in [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]


def test_param_groups_skip_frozen_parameters() -> None:
    model = create_model("resnet18", 5)
    freeze_backbone(model)
    groups = param_groups(model, lr=0.03, weight_decay=1e-4)
    assert [(g["name"], len(g["params"])) for g in groups] == [("head", 1), ("head_no_decay", 1)]


def test_zero_init_residual_zeroes_last_bn_of_each_block() -> None:
    basic = create_model("resnet18", 2, zero_init_residual=True)
    assert all(block.bn2.weight.abs().sum() == 0 for block in basic.layer3)
    assert basic.bn1.weight.abs().sum() == 64  # the stem is untouched
    bottleneck = create_model("resnet50", 2, zero_init_residual=True)
    assert all(block.bn3.weight.abs().sum() == 0 for block in bottleneck.layer1)


# ---------------------------------------------------------------- loading errors


def test_wrong_conv_shape_names_the_tensor(tmp_path: Path) -> None:
    state = create_model("resnet18", 10).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(PipelineError, match=r"layer2\.0\.conv1\.weight file \(128, 64, 5, 5\)"):
        load_weights(create_model("resnet18", 10), path)


def test_malicious_pickle_is_refused_unrun(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Exploit()}, path)
    with pytest.raises(PipelineError, match="refused as unsafe: loading it would call posix.system"):
        load_weights(create_model("resnet18_cifar", 10), path)
    assert not marker.exists()


def test_checkpoint_dict_with_module_prefix_loads(tmp_path: Path) -> None:
    source = create_model("resnet18_cifar", 10)
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": wrapped, "epoch": 3, "config": {"lr": 0.1}}, path)
    model = create_model("resnet18_cifar", 10, weights=path)
    torch.testing.assert_close(model.fc.weight, source.fc.weight)


@pytest.mark.parametrize("filename, content, message", [
    ("missing.pth", None, "not found"),
    ("weights.h5", b"x", "unknown suffix"),
    ("garbage.pth", b"not a pickle at all", "not a readable PyTorch file"),
    ("garbage.safetensors", b"\x00" * 16, "not a valid .safetensors"),
])
def test_bad_weight_files_are_user_errors(tmp_path: Path, filename: str, content: bytes | None,
                                          message: str) -> None:
    path = tmp_path / filename
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PipelineError, match=message):
        load_weights(create_model("resnet18_cifar", 10), path)


# ---------------------------------------------------------------- pretrained download (mocked)


def test_pretrained_downloads_torchvision_url_and_drops_fc(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = torchvision_model("resnet18").state_dict()
    urls = []

    def fake_download(url: str, **kwargs: object) -> dict:
        urls.append((url, kwargs.get("weights_only")))
        return reference

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = create_model("resnet18", 10, pretrained=True)
    assert urls == [(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, True)]
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])
    assert model.fc.weight.shape == (10, 512)


def test_pretrained_offline_tells_user_to_pass_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(url: str, **kwargs: object) -> dict:
        raise URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(PipelineError, match="--weights FILE"):
        create_model("googlenet", 5, pretrained=True)
    with pytest.raises(PipelineError, match="no pretrained weights"):
        create_model("resnet18_cifar", 10, pretrained=True)


# ---------------------------------------------------------------- registry


def test_unknown_model_lists_choices() -> None:
    with pytest.raises(PipelineError) as error:
        create_model("resnet19", 10)
    assert all(name in str(error.value) for name in list_models())
    assert "timm:<name>" in str(error.value)


def test_unknown_timm_model_suggests_close_names() -> None:
    with pytest.raises(PipelineError, match="timm:tf_efficientnet_lite0"):
        create_model("timm:tf_efficientnet_lite", 10)


def test_duplicate_registration_is_an_error() -> None:
    def resnet18(num_classes: int = 1000) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(PipelineError, match="registered twice"):
        register_model(resnet18)
    assert create_model("resnet18", 3).fc.in_features == 512  # the original stays
