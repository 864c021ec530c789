"""The work folder's layout: every file and folder name reorg writes and the later stages read.

Like pipeline/runs.py for a run, this module alone spells them; a test fails
if another module does.
"""
from __future__ import annotations

SPLITS = ("train", "valid", "train_valid")  # class-folder trees of the labelled images
TEST_DIR = "test"
TEST_CLASS_DIR = "unknown"  # test/unknown/: the test images, ImageFolder-compatible
REORG_FILE = "reorg.json"  # classes in the submission's order, counts, seed, fingerprint
FOLDS_FILE = "folds.csv"  # id, label, fold
IMAGES_DIR = "images"  # the labelled images of a task other than single (no class folders): items.csv says what
ITEMS_FILE = "items.csv"  # one row per labelled image: id, file, split, fold, group, label, targets, metadata
TEST_ITEMS_FILE = "test_items.csv"  # one row per test image: id, file, metadata (when the spec has metadata)
LABEL_JOIN = "|"  # a label set as text (items.csv's and oof.csv's label): labels may hold spaces
TARGET_PREFIX, META_PREFIX = "y:", "m:"  # items.csv's columns: one per model output, one per metadata column
SAMPLE_FILE = "sample_submission.csv"  # a copy of the download's, for predict and check
CACHE_DIR = "cache"  # decoded images and frozen-backbone features, keyed on what they depend on
LOCK_FILE = ".reorg.lock"  # held by the one reorg that writes the folder

BAD_TARGET = -100  # the target of an item whose image cannot be decoded: cross_entropy's ignore_index
