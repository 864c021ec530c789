"""File and folder names of the work folder's images, whatever the labels and ids (reorg and the items table)."""
from __future__ import annotations

import hashlib
from urllib.parse import quote

MAX_DIR_NAME = 200  # bytes of a class folder name, under every file system's 255


def class_dir_name(label: str) -> str:
    """A folder name for a class that stays inside its parent whatever the label.

    Percent-encoding keeps names distinct and free of separators; a leading dot
    is encoded so no class folder is hidden or '..'. Names that would pass the
    file-system limit (255 bytes) are cut and end in a digest of the label.
    """
    name = quote(label, safe=" _-+,()'&=@")
    name = "%2E" + name[1:] if name.startswith(".") else name
    if len(name) > MAX_DIR_NAME:
        name = name[: MAX_DIR_NAME - 17] + "~" + hashlib.sha256(label.encode()).hexdigest()[:16]
    return name


def link_name(image_id: str, source: str, image_ext: str) -> str:
    """The file name of an image in WORK_DIR: its id and the source's own spelling of image_ext.

    Every name ends in image_ext (any case), so pipeline.data.items reads the id back
    exactly: ``abc.jpg`` listed by path becomes ``abc.jpg.jpg``, id ``abc.jpg``.
    """
    suffix = source[-len(image_ext):]
    return image_id + (suffix if suffix.lower() == image_ext.lower() else image_ext)
