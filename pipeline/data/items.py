"""Datasets, transforms and loaders over the trees that reorg wrote.

Class indices follow reorg.json's class list (the submission's order), never a
sort of folder names; every sample carries its index so ids come from the
dataset itself.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from pipeline.config import AUGMENTS
from pipeline.data import presets
from pipeline.errors import PipelineError
from pipeline.imagefile import open_image
from pipeline.io import read_json
from pipeline.models.task import bad_target
from pipeline.workdir import FOLDS_FILE, ITEMS_FILE, REORG_FILE, TARGET_PREFIX, TEST_CLASS_DIR

log = logging.getLogger("pipeline")

# Refuse images over ~180 megapixels outright (PIL's bomb check raises at twice this)
Image.MAX_IMAGE_PIXELS = 89_478_485


@dataclass(frozen=True)
class Item:
    """One image: its id, its file and its target: a class index (-1 when unknown), or for the other task
    kinds (pipeline/models/task.py) a tuple of floats (inf when unknown: a test image). ``test``: an image of
    the test split, whose id may repeat a training image's (Kaggle numbers both from 1, as cifar-10 does)."""

    id: str
    path: Path
    target: int | tuple[float, ...]
    test: bool = False

    @property
    def key(self) -> tuple[bool, str]:
        """The item's identity in a pool of labelled and test images (pseudo-labels train on both)."""
        return self.test, self.id


def load_reorg(work_dir: Path, competition: str | None = None) -> dict:
    """reorg.json of a complete tree, or an error saying to run reorg; with ``competition`` (a slug), an error
    when the folder was reorganised for another one."""
    info = read_json(Path(work_dir) / REORG_FILE, "WORK_DIR is not a finished reorg; run `pipeline reorg` first",
                     "run `pipeline reorg --force` to rebuild it")
    if competition is not None and info["competition"] != competition:
        raise PipelineError(f"{work_dir} was reorganised for {info['competition']!r}, not {competition!r}; "
                            "pass the WORK_DIR of this competition or reorganise its download there")
    return info


def _id_of(name: str, ext: str) -> str:
    return name[: -len(ext)] if name.lower().endswith(ext.lower()) else Path(name).stem


def list_split(work_dir: Path, info: dict, split: str) -> list[Item]:
    """Every image of ``split`` (train, valid, train_valid or test), sorted by class then id (single-label:
    the class-folder trees) or by id (the other kinds: items.csv)."""
    root = Path(work_dir) / split
    ext = info["image_ext"]
    if split == "test":
        folder = root / TEST_CLASS_DIR
        unknown = -1 if info.get("task", "single") == "single" else (math.inf,) * len(info["classes"])  # not NaN: unreadable
        return [Item(_id_of(p.name, ext), p, unknown, test=True) for p in sorted(folder.iterdir())]
    if info.get("task", "single") != "single":
        return _table_items(Path(work_dir), info, split)
    items = []
    for target, folder in enumerate(info["class_dirs"]):
        class_dir = root / folder
        if class_dir.is_dir():
            items.extend(Item(_id_of(p.name, ext), p, target) for p in sorted(class_dir.iterdir()))
    return items


def read_items(work_dir: Path) -> pd.DataFrame:
    """items.csv: one row per labelled image (pipeline/download/items_table.py writes it)."""
    path = Path(work_dir) / ITEMS_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: the work folder predates it; run `pipeline reorg --force`")
    return pd.read_csv(path, dtype={"id": str, "file": str, "split": str, "group": str, "label": str},
                       keep_default_na=False)


def _table_items(work_dir: Path, info: dict, split: str) -> list[Item]:
    frame = read_items(work_dir)
    if split != "train_valid":
        frame = frame[frame["split"] == split]
    frame = frame.sort_values("id", kind="stable")
    targets = frame[[TARGET_PREFIX + name for name in info["classes"]]].to_numpy(dtype=np.float64)
    return [Item(i, work_dir / f, tuple(t)) for i, f, t in zip(frame["id"], frame["file"], targets.tolist())]


def target_text(info: dict, target) -> str:
    """An item's target as text: its class name, or its label (items.csv's)."""
    if isinstance(target, int):
        return info["classes"][target]
    return ",".join(repr(float(v)) for v in target)


def training_fingerprint(work_dir: Path, info: dict) -> str:
    """A digest of what a run learns from: every training image's id, class name and size.

    Two work folders made from the same download (with any split seed) agree;
    another download, a relabelled image or a changed file does not.
    """
    digest = hashlib.sha256(info["competition"].encode())
    for it in sorted(list_split(work_dir, info, "train_valid"), key=lambda it: it.id):
        digest.update(f"{it.id}\t{target_text(info, it.target)}\t{os.stat(it.path).st_size}\n".encode())
    return digest.hexdigest()[:16]


def read_folds(work_dir: Path) -> pd.Series:
    """Fold number per id from folds.csv, or an error saying how to make it."""
    path = Path(work_dir) / FOLDS_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: run `pipeline reorg ... --folds K` (K >= 2) first")
    frame = pd.read_csv(path, dtype={"id": str, "label": str, "fold": int}, keep_default_na=False)
    return frame.set_index("id")["fold"]


def fold_split(work_dir: Path, info: dict, fold: int) -> tuple[list[Item], list[Item]]:
    """(train, valid) items of CV fold ``fold``: valid is that fold, train the others."""
    folds = read_folds(work_dir)
    n_folds = int(folds.max()) + 1
    if not 0 <= fold < n_folds:
        raise PipelineError(f"--fold {fold} is out of range: folds.csv has folds 0..{n_folds - 1}")
    items = list_split(work_dir, info, "train_valid")
    train = [it for it in items if folds.get(it.id) != fold]
    valid = [it for it in items if folds.get(it.id) == fold]
    return train, valid


def n_folds(work_dir: Path) -> int:
    return int(read_folds(work_dir).max()) + 1


# ---------------------------------------------------------------- decoding


def read_image(path: Path, min_side: int | None = None, fast: bool = True) -> np.ndarray:
    """Decode any common image file to an RGB uint8 array (H, W, 3).

    Applies the EXIF orientation, maps grayscale, palette, RGBA, CMYK and 16-bit
    images to 8-bit RGB, and lets JPEG decode at a reduced scale when the model
    needs no more than ``min_side`` pixels a side (PIL's draft mode). A JPEG
    that draft cannot shrink (a 224-px model on a 500x375 photo) is decoded by
    libjpeg-turbo through torchvision (``fast``; False: PIL, for comparison).
    """
    with open_image(path) as img:  # reads the header only: size and bomb checks, any failure one error
        if img.format == "JPEG":
            if fast and (not min_side or 2 * min_side > min(img.size)):  # draft cannot shrink it
                decoded = _decode_jpeg_fast(path)
                if decoded is not None:
                    return decoded
            img.draft("RGB", (min_side, min_side) if min_side else img.size)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            scale = 65535.0 if arr.max() > 255 else 255.0
            gray = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))


def _decode_jpeg_fast(path: Path) -> np.ndarray | None:
    """libjpeg-turbo through torchvision (about 1.3x PIL here, same pixels); None to fall back.

    torchvision 0.29 deprecates its decoders in favour of torchcodec; when they
    are gone the import fails and PIL decodes everything.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torchvision.io import ImageReadMode, decode_image, read_file

            tensor = decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except (ImportError, RuntimeError, ValueError):
            return None
    return tensor.permute(1, 2, 0).numpy()


class ImageDataset(Dataset):
    """Decoded, transformed images with their targets and positions.

    ``__getitem__`` returns (image tensor (3, H, W), target, index). An image
    that cannot be decoded is an error when ``strict``; otherwise it becomes a
    black image with target BAD_TARGET, which the loss and the scores ignore;
    the loops that see such targets report them (once per run, not per epoch).
    """

    def __init__(self, items: list[Item], transform: A.Compose, image_size: int, strict: bool = False,
                 decode=read_image):
        self.items = items
        self.transform = transform
        self.image_size = image_size
        self.strict = strict
        self.decode = decode  # (path, min_side) -> RGB uint8 array; benchmarks swap decoders here

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """``key`` is an index, or (index, seed) from EpochSampler: that sample's augmentation seed."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_transform(self.transform, seed)
        item = self.items[index]
        try:
            image = self.decode(item.path, min_side=self.image_size)
        except Exception as exc:  # PIL raises many types for broken files
            if self.strict:
                raise PipelineError(f"cannot read image {item.path} (id {item.id!r}): {exc}; replace or remove the file") from exc
            blank = getattr(self.transform, "blank", None)  # an evaluation at several scales: one per scale
            image = blank() if blank else torch.zeros(3, self.image_size, self.image_size)
            return image, _target(bad_target(item.target)), index
        return self.transform(image=image)["image"], _target(item.target), index


def _target(target):
    """A class index as is (collated to a long tensor), float targets as a float32 tensor (stacked)."""
    return target if isinstance(target, int) else torch.tensor(target, dtype=torch.float32)


# ---------------------------------------------------------------- transforms


def seed_transform(transform: A.BaseCompose, seed: int) -> None:
    """Reseed ``transform`` so each transform in it draws from its own stream, fixed by ``seed``.

    albumentations' ``set_random_seed`` gives every transform a generator with
    the same seed, so their first draws coincide: over 2,000 samples of
    resized_crop_flip_jitter, crop area vs brightness r = 0.71, flip vs
    brightness r = -0.87 (tests/test_augment.py measures it). Child seeds from
    ``SeedSequence.spawn`` are independent streams: every |r| < 0.03.
    """
    transform.set_random_seed(seed)  # the Compose's own draws (its p); children are replaced below
    children = np.random.SeedSequence(seed % 2**64).spawn(len(transform.transforms))
    for child, sub in zip(children, transform.transforms):
        sub_seed = int(child.generate_state(1)[0])
        if isinstance(sub, A.BaseCompose):
            seed_transform(sub, sub_seed)
        else:
            sub.set_random_seed(sub_seed)


def _resize(s: int) -> A.BasicTransform:
    return A.Resize(height=s, width=s, interpolation=cv2.INTER_AREA)


def _pad_crop_flip(s: int, train: bool, fill: tuple[int, ...]) -> list:
    if not train:
        return [_resize(s)]
    pad = max(1, s // 8)
    return [_resize(s),
            A.PadIfNeeded(min_height=s + 2 * pad, min_width=s + 2 * pad, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(height=s, width=s), A.HorizontalFlip(p=0.5)]


EVAL_CROP_PCT = 224 / 256  # the centre crop's share of the short side at evaluation (the ImageNet convention)


def _resized_crop_flip_jitter(s: int, train: bool, fill: tuple[int, ...], crop_pct: float = EVAL_CROP_PCT) -> list:
    if not train:
        return [A.SmallestMaxSize(max_size=int(round(s / crop_pct))), A.CenterCrop(height=s, width=s)]
    return [A.RandomResizedCrop(size=(s, s), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0)]


def _letterbox(s: int, train: bool, fill: tuple[int, ...]) -> list:
    # Shrinking before padding gives the same framing as pad-then-resize, with a crisp edge.
    ops = [A.LongestMaxSize(max_size=s, interpolation=cv2.INTER_AREA),
           A.PadIfNeeded(min_height=s, min_width=s, position="center", border_mode=cv2.BORDER_CONSTANT, fill=fill)]
    return (ops + [A.HorizontalFlip(p=0.5)]) if train else ops


def _light(s: int, train: bool, fill: tuple[int, ...]) -> list:
    if not train:
        return [_resize(s)]
    return [_resize(s), A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-10, 10),
                                 border_mode=cv2.BORDER_CONSTANT, fill=fill, p=1.0), A.HorizontalFlip(p=0.5)]


def _none(s: int, train: bool, fill: tuple[int, ...]) -> list:
    return [_resize(s)]


EVAL_CROPS = ("resized_crop_flip_jitter",)  # the presets whose evaluation centre-crops: --test-size auto sets it
_PRESETS = {"pad_crop_flip": _pad_crop_flip, "resized_crop_flip_jitter": _resized_crop_flip_jitter,
            "letterbox": _letterbox, "light": _light, "none": _none, **presets.PRESETS}


def build_transform(augment: str, image_size: int, mean, std, train: bool, seed: int = 0,
                    crop_pct: float | None = None) -> A.Compose:
    """The competition's albumentations pipeline, ending in a normalised tensor.

    - pad_crop_flip (small images, the CIFAR tutorials): resize to size, pad 4
      px of zeros per 32 px, random crop back, horizontal flip.
    - resized_crop_flip_jitter (photos, the dog tutorial): RandomResizedCrop
      scale (0.08, 1), ratio (3/4, 4/3), flip, ColorJitter(0.4, 0.4, 0.4);
      evaluation resizes the short side to size * 256/224 and centre-crops.
    - letterbox (keeps the whole image): longest side to size, pad to a square
      with the mean colour (zero after normalising), centred; flip when training.
    - light (keeps nearly all of it): resize to size x size, then Affine with
      shifts up to 6 %, scale 0.9-1.1, rotation up to 10 degrees; flip.
    - none: resize only.

    Evaluation does the preset's geometry without its randomness (letterbox:
    the same letterbox; light and none: the resize), so train and test framing
    agree. Each random transform draws from its own stream (``seed_transform``).
    ``crop_pct``: the evaluation's centre crop of the EVAL_CROPS presets (None: EVAL_CROP_PCT).
    """
    if augment not in _PRESETS:
        raise PipelineError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    fill = tuple(int(round(255 * m)) for m in mean)
    tail = [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    crop = {"crop_pct": crop_pct} if crop_pct is not None and not train and augment in EVAL_CROPS else {}
    compose = A.Compose(_PRESETS[augment](image_size, train, fill, **crop) + tail, seed=seed)
    seed_transform(compose, seed)
    return compose


def unreadable_message(items: list[Item], positions, what: str) -> str:
    """'N unreadable <what>: path, path, ...' (the first 20 paths)."""
    paths = [str(items[int(i)].path) for i in sorted(positions)]
    more = f" ... and {len(paths) - 20} more" if len(paths) > 20 else ""
    return f"{len(paths)} unreadable {what}: {', '.join(paths[:20])}{more}"
