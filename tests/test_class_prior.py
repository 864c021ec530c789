"""--class-prior: the pretrained classifier's rows for the classes it knows by name start the head."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import SHARED, config_from_recipe, make_competition, requires_shared, write_raw
from pipeline.models import create_model
from pipeline.models.class_prior import class_prior, label_descriptions, match_names, start_head_from
from pipeline.train.logreg import fit_logreg
from pipeline.train.prior_fit import fit_logreg_prior

IMAGENET_NAMES = ("tench", "goldfish", "great_white_shark")  # rows 0, 1, 2 of ImageNet-1k


def test_names_match_by_synonym_ignoring_case_and_separators_and_never_by_position():
    labels = ("tench, Tinca tinca", "goldfish, Carassius auratus", "crane", "crane", "Boston bull, Boston terrier")
    assert match_names(["Boston_Terrier", "goldfish", "tinca-tinca", "dingo"], labels) == {0: 4, 1: 1, 2: 0}
    assert match_names(["goldfish", "tench"], labels) == {0: 1, 1: 0}  # follows the names, not the order
    assert match_names(["crane"], labels) == {}  # two ImageNet classes share the name: no match
    assert match_names(["boston bull", "boston terrier"], labels) == {}  # two classes claim one row: neither


def test_imagenet_descriptions_come_with_timm_for_known_class_counts_only():
    labels, dataset = label_descriptions(1000)
    assert dataset == "imagenet-1k" and labels[0].startswith("tench") and len(labels) == 1000
    assert label_descriptions(7) is None


def _weights_with_a_1000_class_head(tmp_path, seed=0):
    """A fastnet_s checkpoint with a 1000-way classifier (the layout ImageNet weights have)."""
    torch.manual_seed(seed)
    net = create_model("fastnet_s", 1000)
    with torch.no_grad():
        net.get_classifier().weight.normal_()
        net.get_classifier().bias.normal_()
    path = tmp_path / "in1k.pt"
    torch.save(net.state_dict(), path)
    return path, net.get_classifier().weight.detach().clone(), net.get_classifier().bias.detach().clone()


def test_the_dropped_classifier_is_kept_and_its_rows_follow_the_class_names(tmp_path):
    path, w1000, b1000 = _weights_with_a_1000_class_head(tmp_path)
    classes = ["great_white_shark", "not_an_imagenet_class", "tench", "goldfish"]
    model = create_model("fastnet_s", len(classes), weights=path)
    assert torch.equal(model.pretrained_head.weight, w1000)
    prior = class_prior(model, classes)
    assert prior.matched.tolist() == [True, False, True, True]
    scale = model.logit_scale  # the pretrained network's logits are scale * (W x + b)
    assert torch.allclose(prior.weight[0], w1000[2] * scale) and torch.allclose(prior.bias[2], b1000[0] * scale)
    assert not prior.weight[1].any() and prior.bias[1] == 0
    start_head_from(model, prior)
    head = model.get_classifier()
    assert torch.allclose(head.weight[3], w1000[1]) and not head.weight[1].any()  # unmatched: still zero
    assert class_prior(model, classes, "off") is None
    assert class_prior(model, ["tench", "a", "b", "c"]) is None  # under half the classes match: not used
    assert class_prior(create_model("fastnet_s", 4), classes) is None  # no pretrained head: nothing


def _prior_data(n_per_class: int, seed: int, absent: int | None = None):
    """Features whose true class follows softmax(2 * prior logits): a good but imperfect prior."""
    rng = np.random.default_rng(seed)
    k, f = 4, 6
    pw, pb = rng.normal(size=(k, f)), rng.normal(size=k) * 0.1
    x = rng.normal(size=(k * n_per_class * 8, f))
    logits = 2 * (x @ pw.T + pb)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    keep = y != absent if absent is not None else np.ones(len(y), bool)
    return x, y, keep, pw, pb


def test_the_head_around_a_good_prior_beats_the_plain_head_on_few_images_and_keeps_an_absent_class():
    x, y, keep, pw, pb = _prior_data(6, seed=1, absent=3)
    train, test = np.arange(len(y)) < 96, np.arange(len(y)) >= 96
    fit = train & keep  # class 3 never occurs in the training rows
    w, b, info = fit_logreg_prior(x[fit], y[fit], pw, pb, cs=(0.01,))
    w0, b0, _ = fit_logreg(x[fit], y[fit], 4, seed=0)

    def loss(weight, bias, rows):
        logits = torch.from_numpy(x[rows] @ weight.T + bias)
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[rows])))

    assert loss(w, b, test) < loss(w0, b0, test) - 0.1
    absent = test & (y == 3)
    p_prior = torch.softmax(torch.from_numpy(x[absent] @ w.T + b), 1)[:, 3].mean()
    p_plain = torch.softmax(torch.from_numpy(x[absent] @ w0.T + b0), 1)[:, 3].mean()
    assert p_prior > 0.3 and p_plain < 0.05  # the prior still knows the class no training row showed
    assert 1.0 < info["prior_alpha"] < 3.5  # it learnt how far to trust the prior (the truth: 2)


def test_the_fitted_head_is_one_linear_layer_and_the_same_on_every_run():
    x, y, _, pw, pb = _prior_data(3, seed=2)
    meta = np.random.default_rng(3).normal(size=(len(y), 2))  # columns past the prior's: no prior there
    xm = np.hstack([x, meta])
    w, b, info = fit_logreg_prior(xm, y, pw, pb, seed=0)
    assert w.shape == (4, 8) and set(info["inner_cv_log_loss"]) == {"0.001", "0.01", "0.1"}
    w1, b1, _ = fit_logreg_prior(xm, y, pw, pb, cs=(0.01,))
    w2, b2, _ = fit_logreg_prior(xm, y, pw, pb, cs=(0.01,))
    assert np.array_equal(w1, w2) and np.array_equal(b1, b2)
    # with a huge penalty the correction vanishes: the head is alpha times the prior
    w3, b3, info3 = fit_logreg_prior(xm, y, pw, pb, cs=(1e-6,))
    alpha = info3["prior_alpha"]
    assert alpha > 0.5
    assert np.allclose(w3[:, :6], alpha * pw, atol=1e-3) and np.allclose(w3[:, 6:], 0, atol=1e-3)
    assert np.allclose(b3, alpha * pb, atol=1e-3)


def test_a_frozen_logreg_run_fits_around_the_prior_and_says_so(tmp_path, caplog):
    from pipeline.download.reorg import reorg
    from pipeline.train.stage import train

    comp = make_competition("toy-prior", submission="probs")
    raw = write_raw(tmp_path / "raw", comp, classes=IMAGENET_NAMES, per_class=6, n_test=3, size=16)
    reorg(comp, raw, tmp_path / "work", valid_ratio=0.25, folds=0, seed=0)
    path, _, _ = _weights_with_a_1000_class_head(tmp_path)
    runs = {}
    for mode in ("auto", "off"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline"):
            train(config_from_recipe(comp, tmp_path / "work", tmp_path / mode, weights=str(path),
                                     freeze_backbone=True, head="logreg", feature_views=0, epochs=1,
                                     batch_size=8, device="cpu", class_prior=mode))
        runs[mode] = caplog.text
    assert "class prior: 3 of 3 classes match the pretrained head's imagenet-1k labels" in runs["auto"]
    assert "around the class prior (alpha" in runs["auto"]
    assert "class prior" not in runs["off"] and "around the class prior" not in runs["off"]
    records = {mode: json.loads(next((tmp_path / mode).rglob("head_fit.json")).read_text()) for mode in runs}
    assert records["auto"]["prior"].startswith("3 of 3 classes") and records["auto"]["prior_alpha"] != 1.0
    assert "prior" not in records["off"]


@pytest.mark.parametrize("head", ["linear"])
def test_a_trainable_linear_head_starts_from_the_prior(tmp_path, head):
    from pipeline.train.setup import start_from_prior
    from pipeline.config import TrainConfig
    from pipeline.models.task import Task

    path, w1000, _ = _weights_with_a_1000_class_head(tmp_path)
    model = create_model("fastnet_s", 3, weights=path)
    cfg = TrainConfig(model="fastnet_s", head=head)
    prior = start_from_prior(model, cfg, Task("single", ("goldfish", "tench", "zzz")))
    assert prior is not None and torch.allclose(model.get_classifier().weight[1], w1000[0])
    mlp = TrainConfig(model="fastnet_s", head="mlp")
    assert start_from_prior(model, mlp, Task("single", ("goldfish", "tench", "zzz"))) is None


@requires_shared
def test_timms_own_pretrained_route_keeps_the_imagenet_classifier(monkeypatch):
    """The hub route (here fed the shared file, as timm's pretrained_cfg_overlay does offline): the model is
    built with ImageNet's 1000 classes, that classifier kept, then replaced by the competition's."""
    import timm

    from pipeline.models import timm_models

    weights = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"
    real = timm.create_model
    monkeypatch.setattr(timm_models.timm, "create_model", lambda name, pretrained=False, **kw: real(
        name, pretrained=pretrained, pretrained_cfg_overlay={"file": str(weights)}, **kw))
    model = create_model("timm:tf_efficientnet_lite0", 3, pretrained=True)
    reference = create_model("timm:tf_efficientnet_lite0", 3, weights=weights)  # the --weights FILE route
    assert model.get_classifier().out_features == 3 and not model.get_classifier().weight.any()
    assert torch.equal(model.pretrained_head.weight, reference.pretrained_head.weight)
    prior = class_prior(model, ["goldfish", "tench", "great_white_shark"])
    assert prior.matched.all() and torch.equal(prior.weight[1], reference.pretrained_head.weight[0])
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)  # both routes build the same network
