"""A K-fold frozen-backbone ensemble's predict time: the backbone once per image and view, or per member.

Writes a K-member run over the dog-breed sample (EfficientNet-Lite0 with the
shared ImageNet weights, frozen, K random heads: prediction cost does not
depend on training) and times `pipeline predict` on it, with this checkout's
package or another one's (``--code DIR``, e.g. a worktree of an older commit:
its predict read the same files). Prints seconds and backbone passes.

    python benchmarks/bench_shared_backbone.py [--folds 5] [--tta flip] [--code DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"
DATA = SHARED / "data" / "dog-breed-identification"


def write_run(work: Path, run_dir: Path, folds: int) -> None:
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import TrainConfig
    from pipeline.data.items import load_reorg
    from pipeline.io import atomic_write_json
    from pipeline.models import create_model, freeze_backbone
    from pipeline.runs import FOLD, Run, member_name

    info = load_reorg(work)
    run = Run(run_dir)
    cfg = TrainConfig(competition=info["competition"], work_dir=work, run_dir=run_dir, model="timm:tf_efficientnet_lite0",
                      weights=WEIGHTS, image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, freeze_backbone=True,
                      head="mlp", augment="resized_crop_flip_jitter")
    atomic_write_json(run.config_path, {"config": cfg.to_json()})
    for k in range(folds):
        torch.manual_seed(k)
        model = create_model(cfg.model, len(info["classes"]), weights=WEIGHTS, head="mlp")
        freeze_backbone(model)
        member = run.member(member_name(FOLD, k))
        save_checkpoint(member.best_path, {"model": model.state_dict(), "config": cfg.to_json(),
                                           "classes": info["classes"]})
        member.mark_done({"epochs": 1, "best": {"epoch": 1, "metric": 0.0, "variant": "live"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tta", default="flip")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose `pipeline predict` is timed")
    args = parser.parse_args()
    if not (DATA.is_dir() and WEIGHTS.is_file()):
        print(f"skipped: {DATA} or {WEIGHTS} is absent")
        return
    sys.path.insert(0, str(ROOT))
    tmp = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "reorg", "dog-breed-identification", str(DATA),
                    str(tmp / "work"), "--folds", str(args.folds)], check=True, env=env)
    write_run(tmp / "work", tmp / "run", args.folds)
    env["PYTHONPATH"] = str(args.code.resolve())
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "predict", "dog-breed-identification", str(tmp / "work"),
                    str(tmp / "run"), str(tmp / "sub.csv"), "--tta", args.tta, "--device", "cpu"], check=True, env=env)
    seconds = time.perf_counter() - start
    views = 2 if args.tta == "flip" else 1
    print(f"code {args.code.resolve()}: {args.folds} frozen members, 300 test images at 224 px, tta {args.tta} "
          f"({views} view(s)): predict {seconds:.1f}s")


if __name__ == "__main__":
    main()
