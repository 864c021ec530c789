"""How long a kernel's predict will take on Kaggle, from the time the run's last predict took here.

``pipeline predict`` records its seconds, test images, members, TTA views and
device (RUN_DIR/predict_time.json). That gives seconds per image per member
per view, which scales to the kernel's members, views and test images; a safety
factor covers Kaggle's slower GPUs (a P100 or T4 against the GPU measured on),
and the kernel warns when the estimate would pass Kaggle's run-time limit.
Measured on a CPU, the figure is far above what a --gpu kernel takes: the line
says where it was measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KAGGLE_LIMIT_HOURS = 9.0  # a Kaggle notebook session's run-time limit, CPU or GPU
SAFETY = 2.0  # Kaggle's P100/T4 against a recent GPU; also the image decoding of a 2-core kernel


@dataclass(frozen=True)
class PredictEstimate:
    seconds: float  # the kernel's predict, safety factor included
    per_image: float  # measured seconds per test image, per member, per view
    images: int
    members: int
    views: int
    safety: float
    measured_on: str

    def line(self) -> str:
        return (f"predict estimate: {format_hours(self.seconds)} for {self.images} test images x {self.members} "
                f"member(s) x {self.views} view(s) at {self.per_image * 1000:.3g} ms each (measured on "
                f"{self.measured_on} by the run's last predict) x safety factor {self.safety:g}")


def per_image_seconds(record: dict) -> float:
    """Seconds per image, per member, per view, of a predict time record (pure)."""
    return float(record["seconds"]) / max(1, int(record["images"]) * int(record["members"]) * int(record["views"]))


def estimate_seconds(per_image: float, images: int, members: int, views: int, safety: float = SAFETY) -> float:
    """The kernel's predict time (pure): per image x test images x members x views x safety factor."""
    return per_image * images * members * views * safety


def over_limit(estimate: PredictEstimate, limit_hours: float = KAGGLE_LIMIT_HOURS) -> str | None:
    """The one-line warning when the estimate passes ``limit_hours`` (pure), else None."""
    if estimate.seconds <= limit_hours * 3600:
        return None
    return (f"warning: the kernel's predict may take {format_hours(estimate.seconds)}, over Kaggle's "
            f"{limit_hours:g} h limit: fewer members (--predict-args \"--members ...\"), fewer TTA views, a smaller "
            "model, or --gpu")


def format_hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def count_test_images(work_dir: Path | None, fallback: int) -> int:
    """Rows of the work folder's sample submission (the test set the kernel predicts), else ``fallback``."""
    from pipeline.io import read_csv
    from pipeline.workdir import SAMPLE_FILE

    path = Path(work_dir) / SAMPLE_FILE if work_dir else None
    return len(read_csv(path, what="sample submission")) if path and path.is_file() else fallback


def view_count(tta: str) -> int:
    """Views of a TTA setting, as predict makes them (an unknown view: one line naming the valid ones)."""
    from pipeline.errors import tta_views

    return len(tta_views(tta))


def run_estimate(run_dir: Path, tta: str | None = None, safety: float = SAFETY) -> PredictEstimate | None:
    """The kernel's predict estimate from the run's last predict (None when it never predicted): the
    kernel's ``tta`` (default: the one that predict used), the run's work folder's test images."""
    from pipeline.config import load_resolved
    from pipeline.runs import Run

    run = Run(run_dir)
    record = run.read_predict_time()
    if record is None:
        return None
    cfg, _ = load_resolved(run.config_path)
    views = view_count(tta) if tta else int(record["views"])
    images = count_test_images(cfg.work_dir, int(record["images"]))
    per_image = per_image_seconds(record)
    members = int(record["members"])
    return PredictEstimate(estimate_seconds(per_image, images, members, views, safety), per_image, images, members,
                           views, safety, str(record.get("device", "?")))
