"""CPU inference speed of the model zoo: parameters, default input size, images/s.

    python benchmarks/bench_models.py [--models resnet18 timm:resnet10t] [--batch 8] [--iters N]

Eval mode, no_grad, one warm-up batch, then ``--iters`` timed batches (without
``--iters``: batches for about ``--seconds``, at least one), reporting the
fastest. The default run over every model takes about two minutes on 2 cores.
Run from the repository root with the package importable (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from pipeline.models import create_model, list_models, model_data_config

DEFAULT_EXTRA = ("timm:tf_efficientnet_lite0",)


def time_forward(model: nn.Module, batch: torch.Tensor, iters: int | None, seconds: float) -> float:
    """Images per second of ``model(batch)`` from the fastest timed batch.

    The fastest, as ``timeit`` advises: slower batches measure whatever else the
    machine was doing. A first untimed call absorbs one-off setup.
    """
    times: list[float] = []
    with torch.no_grad():
        model(batch)
        while not times or (len(times) < iters if iters else sum(times) < seconds):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return batch.shape[0] / min(times)


def bench(name: str, batch_size: int, iters: int | None, seconds: float) -> tuple[str, int, str, float]:
    """One table row: name, parameters, input size, images/s at the default input size."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000).eval()
    channels, height, width = model_data_config(model, pretrained=False)["input_size"]
    batch = torch.randn(batch_size, channels, height, width)
    speed = time_forward(model, batch, iters, seconds)
    params = sum(p.numel() for p in model.parameters())
    return name, params, f"{channels}x{height}x{width}", speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*list_models(), *DEFAULT_EXTRA],
                        help="registered names or timm:<name> (default: all registered + lite0)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward call")
    parser.add_argument("--iters", type=int, default=None, help="timed batches per model")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="time budget per model when --iters is not given")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'model':<28} {'parameters':>12} {'input':>10} {'images/s':>10}")
    for name in args.models:
        name, params, size, speed = bench(name, args.batch, args.iters, args.seconds)
        print(f"{name:<28} {params:>12,} {size:>10} {speed:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
