"""One inference path: members over images, shared frozen backbones, TTA, the finished-member rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.checkpoint import save_checkpoint
from pipeline.config import TrainConfig
from pipeline.data.items import list_split, load_reorg
from pipeline.errors import PipelineError
from pipeline.models.inference import infer, normalise_rows
from pipeline.models import create_model, freeze_backbone
from pipeline.data.plan import eval_loader
from pipeline.predict.stage import load_member, predict_items
from pipeline.download.reorg import reorg
from pipeline.runs import FOLD, Run, member_name


@pytest.fixture
def toy_work(toy, tmp_path):
    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", folds=5)
    return comp, tmp_path / "work"


def write_member(run: Run, name: str, cfg: TrainConfig, classes: list[str], seed: int, done: bool = True) -> None:
    """A finished member with a random head on the model (no training: inference is under test)."""
    torch.manual_seed(seed)
    model = create_model(cfg.model, len(classes))
    if cfg.freeze_backbone:
        freeze_backbone(model)
    for p in model.get_classifier().parameters():
        torch.nn.init.normal_(p, std=0.5)  # distinct heads, so averaging them is visible
    member = run.member(name)
    save_checkpoint(member.best_path, {"model": model.state_dict(), "config": cfg.to_json(), "classes": classes})
    if done:
        member.mark_done({"epochs": 1, "best": {"epoch": 1, "metric": 0.5, "variant": "live"}})


def frozen_run(tmp_path, comp, work, n: int = 5) -> tuple[Run, list[str]]:
    info = load_reorg(work)
    run = Run(tmp_path / "run")
    cfg = TrainConfig(competition=comp.slug, work_dir=work, run_dir=run.dir, model="fastnet_s", image_size=16,
                      freeze_backbone=True, augment="none")
    for k in range(n):
        write_member(run, member_name(FOLD, k), cfg, info["classes"], seed=k)
    return run, info["classes"]


def count_backbone_images(monkeypatch) -> list[int]:
    """Images through forward_features, counted per call, for every model instance."""
    from pipeline.models.fastnet import FastNet

    seen: list[int] = []
    original = FastNet.forward_features

    def counting(self, x):
        seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(FastNet, "forward_features", counting)
    return seen


def test_five_frozen_folds_run_the_backbone_once_per_image_and_view(toy_work, tmp_path, monkeypatch):
    comp, work = toy_work
    run, classes = frozen_run(tmp_path, comp, work)
    items = list_split(work, load_reorg(work), "test")
    seen = count_backbone_images(monkeypatch)
    ids, shared, _ = predict_items(run.finished(), items, tta="flip", device="cpu", batch_size=4)
    assert sum(seen) == len(items) * 2  # once per image and TTA view, not once per member
    assert ids == [it.id for it in items] and np.allclose(shared.sum(axis=1), 1.0)
    # the same numbers as each whole model, backbone and head, run on its own and averaged
    alone = []
    for member in run.finished():
        lm = load_member(member, torch.device("cpu"))
        loader = eval_loader(lm.config, items, 4, torch.device("cpu"), strict=True)
        alone.append(normalise_rows(infer(lm.model, loader, torch.device("cpu"), tta="flip")[0]))
    assert np.allclose(shared, sum(alone) / len(alone), atol=1e-5)
    assert not np.allclose(alone[0], alone[1], atol=1e-3)  # the heads differ, so the average is a real one


def test_unfinished_members_are_never_predicted_with(toy_work, tmp_path):
    comp, work = toy_work
    run, classes = frozen_run(tmp_path, comp, work, n=2)
    cfg = TrainConfig(competition=comp.slug, work_dir=work, run_dir=run.dir, model="fastnet_s", image_size=16)
    write_member(run, member_name(FOLD, 2), cfg, classes, seed=9, done=False)  # a fold still training
    assert [m.name for m in run.finished()] == ["fold0", "fold1"]
    (run.dir / "notes").mkdir()  # a stray folder beside the members
    assert [m.name for m in run.members()] == ["fold0", "fold1", "fold2"]
    empty = Run(tmp_path / "empty")
    write_member(empty, "holdout", cfg, classes, seed=1, done=False)
    with pytest.raises(PipelineError, match="no finished auto model .*still training: holdout"):
        empty.finished()


def test_infer_averages_views_and_gathers_by_position():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.randn(5, 3, 2, 2)
    batches = [(x[3:], torch.tensor([0, 1]), torch.tensor([3, 4])), (x[:3], torch.tensor([2, 0, 1]), torch.arange(3))]
    probs, targets, pos = infer(net, batches, torch.device("cpu"), tta="flip")
    with torch.no_grad():
        want = (torch.softmax(net(x), 1) + torch.softmax(net(torch.flip(x, dims=[3])), 1)) / 2
    assert pos.tolist() == [0, 1, 2, 3, 4] and targets.tolist() == [2, 0, 1, 0, 1]
    assert np.allclose(probs, want.numpy(), atol=1e-6)
    assert np.allclose(normalise_rows(probs).sum(axis=1), 1.0, atol=1e-12)
