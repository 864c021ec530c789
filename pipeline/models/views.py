"""Test-time views of an image batch: each a tiny named function (the names of ``--tta``: pipeline/errors.py tta_views).

An image batch is (B, C, H, W). When the views need several scales the
evaluation loader decodes each image once per scale (pipeline/data/views.py)
and a batch is a list of tensors, one per scale in :func:`scales`
order; a view takes its operation of the tensor at its scale. The scaled
images come from the decoded file, never from upsampling the tensor
(pipeline/data/views.py says why).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.errors import VIEW_OPS, tta_views

OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "flip": lambda x: torch.flip(x, dims=[3]),  # mirror left-right
    "vflip": lambda x: torch.flip(x, dims=[2]),  # mirror up-down
    "rot90": lambda x: torch.rot90(x, 1, dims=(2, 3)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(2, 3)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(2, 3)),
    "transpose": lambda x: x.transpose(2, 3),  # mirror about the main diagonal
    "transverse": lambda x: torch.rot90(x, 2, dims=(2, 3)).transpose(2, 3),  # about the other diagonal
    "shiftul": lambda x: shifted(x, -1),
    "shiftdr": lambda x: shifted(x, 1),
    "flipshiftul": lambda x: shifted(torch.flip(x, dims=[3]), -1),
    "flipshiftdr": lambda x: shifted(torch.flip(x, dims=[3]), 1),
}
assert set(OPS) == set(VIEW_OPS)


def shifted(x: torch.Tensor, direction: int) -> torch.Tensor:
    """The batch moved diagonally by side/32 px (at least 1): up-left for -1, down-right for +1; the border that
    comes in is the image's own, mirrored (the small translations the training crops drew)."""
    h, w = x.shape[-2:]
    step = max(1, min(h, w) // 32)
    padded = torch.nn.functional.pad(x, (step, step, step, step), mode="reflect")
    at = step - direction * step  # where the window starts in the padded batch
    return padded[..., at : at + h, at : at + w]


def scales(tta: str) -> tuple[float, ...]:
    """The distinct scales the views of ``tta`` need, ascending: the loader decodes one side per scale."""
    return tuple(sorted({scale for _, scale in tta_views(tta)}))


def is_plain(tta: str) -> bool:
    """One view: the image as it is."""
    return tta_views(tta) == (("none", 1.0),)


def first_view_share(tta: str) -> float:
    """The first view's share of the cost of the views, each taken as proportional to its pixels (scale squared)."""
    costs = [scale ** 2 for _, scale in tta_views(tta)]
    return costs[0] / sum(costs)


def image_views(x: torch.Tensor | Sequence[torch.Tensor], tta: str) -> list[torch.Tensor]:
    """The view batches of ``tta`` from an image batch, or from a list of batches, one per scale."""
    needed = scales(tta)
    per_scale = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(per_scale) != len(needed):
        raise ValueError(f"--tta {tta} needs images at {len(needed)} scale(s), the loader gave {len(per_scale)}: "
                         "build the loader with pipeline.data.views.eval_transform")
    at = dict(zip(needed, per_scale))
    return [OPS[op](at[scale]) for op, scale in tta_views(tta)]
