"""Shared fixtures: small Kaggle-layout downloads made on the fly, tree hashes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import competitions  # noqa: F401  (fills the registry)
from pipeline.competition import Competition, Recipe, _REGISTRY, register

SHARED = Path(__file__).resolve().parents[2] / "shared"
requires_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"{SHARED}/data is absent")


def make_competition(slug: str = "toy", submission: str = "label", image_ext: str = ".png", **kw) -> Competition:
    """A registered toy competition (removed again by the fixture that uses it)."""
    kw.setdefault("recipe", Recipe(model="fastnet_s", epochs=2, batch_size=16, lr=0.3, schedule="cosine",
                                   augment="pad_crop_flip"))
    comp = Competition(
        slug=slug, title="toy", labels_file="labels.csv", id_column="id", label_column="label",
        sample_submission="sample.csv", submission=submission,
        metric="accuracy" if submission == "label" else "log_loss", image_size=16, image_ext=image_ext,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kw,
    )
    _REGISTRY.pop(slug, None)
    return register(comp)


def write_raw(root: Path, comp: Competition, classes=("cat", "dog", "frog"), per_class: int = 12,
              n_test: int = 10, size: int = 16, seed: int = 0) -> Path:
    """A download of coloured squares: each class has its own colour, so it is learnable."""
    rng = np.random.default_rng(seed)
    (root / comp.train_dir).mkdir(parents=True, exist_ok=True)
    (root / comp.test_dir).mkdir(parents=True, exist_ok=True)
    colours = {c: rng.integers(0, 256, 3) for c in classes}
    rows = []
    for i in range(per_class * len(classes)):
        label = classes[i % len(classes)]
        image_id = f"{i + 1}"
        pixels = np.clip(colours[label] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / comp.train_dir / f"{image_id}{comp.image_ext}",
                                     format="PNG" if comp.image_ext == ".png" else "JPEG")
        rows.append((image_id, label))
    pd.DataFrame(rows, columns=[comp.id_column, comp.label_column]).to_csv(root / comp.labels_file, index=False)
    test_ids = [f"t{i:03d}" for i in range(n_test)]
    for j, image_id in enumerate(test_ids):
        pixels = np.clip(colours[classes[j % len(classes)]] + rng.normal(0, 20, (size, size, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / comp.test_dir / f"{image_id}{comp.image_ext}",
                                                      format="PNG" if comp.image_ext == ".png" else "JPEG")
    if comp.submission == "label":
        sample = pd.DataFrame({comp.id_column: test_ids, "label": classes[0]})
    else:
        sample = pd.DataFrame({comp.id_column: test_ids, **{c: 1 / len(classes) for c in sorted(classes)}})
    sample.to_csv(root / comp.sample_submission, index=False)
    return root


def config_from_recipe(comp, work_dir, run_dir, recipe_name=None, **flags):
    """resolve_config with the flags as keyword arguments, the model registry reading pretrained settings."""
    from pipeline.config import resolve_config
    from pipeline.models import weights_data_config

    return resolve_config(comp, work_dir, run_dir, recipe_name, flags, weights_config=weights_data_config)


def tree_hash(root: Path) -> str:
    """A digest of every path, size, mode and content under ``root``."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            digest.update(f"{path.relative_to(root)}|{st.st_size}|{st.st_mode}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(autouse=True)
def _restore_registry():
    """Competitions a test registers are gone after it."""
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


@pytest.fixture
def toy(tmp_path):
    """(competition, raw_dir) for a 3-class label competition; unregistered afterwards."""
    comp = make_competition("toy")
    raw = write_raw(tmp_path / "raw", comp)
    return comp, raw


@pytest.fixture
def toy_work(toy, tmp_path):
    """(competition, work_dir): the toy download reorganised with a 25% valid split and 3 folds."""
    from pipeline.download.reorg import reorg

    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", valid_ratio=0.25, folds=3, seed=0)
    return comp, tmp_path / "work"


@pytest.fixture
def toy_probs(tmp_path):
    comp = make_competition("toy-probs", submission="probs")
    raw = write_raw(tmp_path / "raw", comp)
    return comp, raw


if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: torch threads would oversubscribe them
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the training processes the tests start
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """On both cores (pytest-xdist's loadgroup): the tests of a module that share one of its module-scoped
    fixtures (a trained run, a browser) run on one worker, so the fixture is built once; every other test
    goes to whichever worker is free, so the slow independent ones spread over both. Slow tests start
    first, so no worker is left alone with a long one at the end."""
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: a module's tests stay together
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        shared = [d for name in info.names_closure for d in info.name2fixturedefs.get(name, ())
                  if d.scope == "module"]
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
