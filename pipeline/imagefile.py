"""Opening an image file: the one place that turns every way a file can fail to open into one error.

Pillow reports a broken file as OSError, SyntaxError or ValueError, and a
file whose header claims more than :data:`MAX_PIXELS` pixels (a decompression
bomb: a few bytes that would decode to gigabytes) as DecompressionBombError,
which is none of those. :func:`open_image` reads only the header, refuses a
bomb before any pixel is decoded (so memory stays bounded), and raises
:class:`UnreadableImage` for all of them: every caller (init's size guess,
training, prediction, the report, predict-image) handles a bomb as the one
unreadable image it is.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from pipeline.errors import PipelineError

MAX_PIXELS = 89_478_485  # Pillow's default: about 0.25 GB of RGB; a larger header is a bomb
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class UnreadableImage(PipelineError):
    """An image file that cannot be opened: missing, broken, not an image, or a decompression bomb."""


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """The opened image (header read, pixels not yet decoded); any failure is :class:`UnreadableImage`."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over MAX_PIXELS: refused, not warned
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            claim = str(exc).split(",")[0].rstrip(".")  # "Image size (N pixels) exceeds limit of M pixels"
            raise UnreadableImage(f"{path} is refused: {claim}; a decompression bomb or a broken header") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnreadableImage(f"{path} is not a readable image ({exc})") from None
        with img:
            yield img
