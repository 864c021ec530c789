"""An image whose header claims a huge size (a decompression bomb) is one unreadable image everywhere.

The bomb is a real 1x1 PNG whose IHDR chunk (with a valid CRC) claims
100000 x 100000 pixels: Pillow refuses it with DecompressionBombError, which
is not an OSError.
"""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.cache import image_cache
from pipeline.data.items import ImageDataset, Item, build_transform, read_image
from pipeline.errors import PipelineError
from pipeline.imagefile import UnreadableImage, open_image
from pipeline.report.build import decode_image
from pipeline.workdir import BAD_TARGET
from tests.test_init import invoke, write_c


def write_bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG of one pixel whose header says ``side`` x ``side``."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # its CRC over type + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_bomb_is_refused_from_its_header_with_memory_bounded(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)  # what Pillow alone does: not an OSError
    tracemalloc.start()
    for opener in (lambda: open_image(bomb).__enter__(), lambda: read_image(bomb), lambda: read_image(bomb, 32)):
        with pytest.raises(UnreadableImage, match=r"bomb\.png is refused: Image size \(10000000000 pixels\)"):
            opener()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 * 2**20  # nothing decoded: under 5 MB, not 30 GB
    medium = write_bomb(tmp_path / "medium.png", side=12_000)  # over the limit, under twice it: a warning in Pillow
    with pytest.raises(UnreadableImage, match="is refused"):
        read_image(medium)


def test_training_and_caches_treat_a_bomb_as_an_unreadable_image(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(good)
    items = [Item("good", good, 1), Item("bomb", write_bomb(tmp_path / "bomb.png"), 2)]
    dataset = ImageDataset(items, build_transform("none", 8, (0.5,) * 3, (0.5,) * 3, train=False), 8)
    assert dataset[0][1] == 1 and dataset[1][1] == BAD_TARGET  # skipped with the usual warning, not a crash
    with pytest.raises(PipelineError, match="cannot read image .*bomb.png .*decompression bomb"):
        ImageDataset(items, dataset.transform, 8, strict=True)[1]
    array, bad = image_cache(tmp_path / "work", items, 8, workers=1)
    assert bad == {1} and array[0].mean() == 200


def test_report_and_predict_image_name_the_bomb_in_one_line(tmp_path):
    bomb = write_bomb(tmp_path / "bomb.png")
    with pytest.raises(PipelineError) as refused:
        decode_image(bomb)
    assert "\n" not in str(refused.value) and f"cannot read image {bomb}" in str(refused.value)
    missing = invoke("predict-image", tmp_path / "run", bomb)
    assert missing.exit_code == 1 and "internal error" not in missing.output


def test_init_skips_a_bomb_when_it_guesses_the_image_size(tmp_path):
    raw = tmp_path / "raw"
    write_c(raw)
    write_bomb(raw / "train" / "cat" / "zz-bomb.png")
    write_bomb(raw / "test" / "a-bomb.png")
    result = invoke("init", raw, "--out", tmp_path / "spec.toml")
    assert result.exit_code == 0, result.output
    assert "internal error" not in result.output and (tmp_path / "spec.toml").is_file()
