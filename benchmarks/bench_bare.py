"""The pipeline against a bare hand-written script doing the same computation, run in turn (A B A B ...).

    python benchmarks/bench_bare.py [--repeat 2] [--data DIR] [--weights FILE] [--folds 3]

A (the pipeline, through its CLI, as a user runs it): the dog recipe's K-fold
frozen-backbone run and its test predictions in one process,

    pipeline train dog-breed-identification WORK RUN --folds K --model timm:tf_efficientnet_lite0
        --weights FILE --feature-views 0 --device cpu --predict OUT.csv

B (this file's ``--bare`` mode, which imports nothing of the package): the same
computation written out by hand with timm, albumentations and scikit-learn:
decode each image once (JPEG draft mode where it can shrink, as the package
does), the eval transform, the backbone's pooled features of every labelled
and test image in batches of the size the package picks on a CPU, then per
fold a logistic regression on standardised features with C chosen by an
inner K-fold CV on the training fold (absent classes get a low bias), the
out-of-fold probabilities (floored at 1e-6, as the submission) and the test
probabilities averaged over the folds' heads. Both read the same folds.csv.

Each run is a fresh process with a fresh feature cache; wall time, CPU time
(user + system, with its children) and peak RSS (the largest process, from
wait4) are taken by this driver. Prints every run, the medians, the ratios
A/B and whether the CV log loss and the test probabilities agree. Targets
(issue 26): time <= 1.1x, peak memory <= 1.5x, identical CV.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
DATA = SHARED / "data" / "dog-breed-identification"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"
MODEL = "tf_efficientnet_lite0"
SLUG = "dog-breed-identification"
CS, INNER_FOLDS, MAX_ITER, ABSENT_MARGIN, FLOOR = (0.1, 1.0, 10.0), 3, 500, 2.0, 1e-6


# ---------------------------------------------------------------- B: the bare computation (no package imports)


def decode(path: str, side: int):
    """RGB uint8 (H, W, 3): JPEG draft mode when it can shrink the image for ``side``, else a full decode."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if img.format == "JPEG" and 2 * side <= min(img.size):
            img.draft("RGB", (side, side))
        elif img.format == "JPEG":
            from torchvision.io import ImageReadMode, decode_image, read_file

            return decode_image(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True
                                ).permute(1, 2, 0).numpy()
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def features(paths: list[str], side: int, mean, std, weights: Path, batch: int, workers: int):
    """Pooled pre-logits features (N, F) float32 of the images; eval transform: short side to side*256/224,
    centre crop."""
    import albumentations as A
    import timm
    import torch
    from albumentations.pytorch import ToTensorV2

    tf = A.Compose([A.SmallestMaxSize(max_size=int(round(side * 256 / 224))), A.CenterCrop(height=side, width=side),
                    A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(image=decode(paths[i], side))["image"]

    model = timm.create_model(MODEL, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(weights)))
    model.eval()
    out = []
    with torch.no_grad():
        for x in torch.utils.data.DataLoader(Images(), batch_size=batch, num_workers=workers):
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).float())
    return torch.cat(out).numpy()


def fit_head(x, y, n_classes: int, seed: int = 0):
    """(W (K, F), b (K,)) of a multinomial logistic regression on raw x, C by inner K-fold CV on standardised x."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    def fit(z, t, c):
        w, b = np.zeros((n_classes, z.shape[1])), np.zeros(n_classes)
        clf = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed).fit(z, t)
        b[:] = clf.intercept_.min() - ABSENT_MARGIN  # classes absent from the fold: well below the others
        w[clf.classes_], b[clf.classes_] = clf.coef_, clf.intercept_
        return w, b

    def loss(logits, t):
        logp = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
        return float(-logp[np.arange(len(t)), t].mean())

    mu, sigma = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sigma
    scores = {}
    for c in CS:
        losses = []
        for tr, va in KFold(INNER_FOLDS, shuffle=True, random_state=seed).split(np.arange(len(y))):
            w, b = fit(z[tr], y[tr], c)
            losses.append(loss(z[va] @ w.T + b, y[va]))
        scores[c] = float(np.mean(losses))
    w, b = fit(z, y, min(scores, key=scores.get))
    weight = w / sigma
    return weight, b - weight @ mu


def probs_of(x, weight, bias):
    """Softmax of the head in float32 (as a torch Linear holds it), rows renormalised in float64."""
    import torch

    logits = torch.nn.functional.linear(torch.from_numpy(x), torch.as_tensor(weight, dtype=torch.float32),
                                        torch.as_tensor(bias, dtype=torch.float32))
    p = torch.softmax(logits, dim=1).double().numpy()
    return p / p.sum(1, keepdims=True)


def floored_log_loss(p, t, n_classes: int) -> float:
    import numpy as np
    from sklearn.metrics import log_loss

    q = np.maximum(p / p.sum(1, keepdims=True), FLOOR)
    return float(log_loss(t, q / q.sum(1, keepdims=True), labels=list(range(n_classes))))


def bare(raw: Path, work: Path, out: Path, weights: Path, side: int, mean, std, batch: int, workers: int) -> None:
    """The whole computation; writes out/cv.json and out/test.csv."""
    import csv

    import numpy as np

    with open(raw / "sample_submission.csv", newline="") as fh:
        reader = csv.reader(fh)
        classes = next(reader)[1:]
        test_ids = [row[0] for row in reader]
    index = {c: i for i, c in enumerate(classes)}
    with open(work / "folds.csv", newline="") as fh:
        rows = sorted(((index[r["label"]], r["id"], int(r["fold"])) for r in csv.DictReader(fh)))  # class, then id
    ids = [r[1] for r in rows]
    y, fold = np.array([r[0] for r in rows]), np.array([r[2] for r in rows])
    x = features([str(raw / "train" / f"{i}.jpg") for i in ids], side, mean, std, weights, batch, workers)
    x_test = features([str(raw / "test" / f"{i}.jpg") for i in test_ids], side, mean, std, weights, batch, workers)
    oof, test, per_fold = np.zeros((len(ids), len(classes))), np.zeros((len(test_ids), len(classes))), []
    for k in range(int(fold.max()) + 1):
        weight, bias = fit_head(x[fold != k], y[fold != k], len(classes))
        oof[fold == k] = probs_of(x[fold == k], weight, bias)
        per_fold.append(floored_log_loss(oof[fold == k], y[fold == k], len(classes)))
        test += probs_of(x_test, weight, bias)
    test /= int(fold.max()) + 1
    cv = {"cv": floored_log_loss(oof, y, len(classes)), "folds": per_fold}
    (out / "cv.json").write_text(json.dumps(cv))
    np.savetxt(out / "test.csv", test, delimiter=",")
    (out / "test_ids.txt").write_text("\n".join(test_ids))


# ---------------------------------------------------------------- the driver


def timed(cmd: list[str], env: dict) -> dict:
    """Wall, CPU (with its children) and peak RSS (largest process) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_gb": usage.ru_maxrss / 1024 ** 2}


def run_pipeline(work: Path, tmp: Path, opts, env: dict) -> dict:
    run, out = tmp / "run", tmp / "sub.csv"
    for path in (run, work / "cache"):
        shutil.rmtree(path, ignore_errors=True)
    out.unlink(missing_ok=True)
    result = timed([sys.executable, "-m", "pipeline", "train", SLUG, str(work), str(run), "--folds", str(opts.folds),
                    "--model", f"timm:{MODEL}", "--weights", str(opts.weights), "--feature-views", "0",
                    "--device", "cpu", "--predict", str(out)], env)
    cv = json.loads((run / "cv.json").read_text())
    config = json.loads((run / "config.json").read_text())
    config = config.get("config", config)
    summary = (run / "summary.txt").read_text().splitlines()
    return {**result, "cv": cv["cv"], "folds": [f["log_loss"] for f in cv["folds"]], "sub": out, "config": config,
            "peaks": [line for line in summary if line.startswith("peak memory")]}


def run_bare(work: Path, tmp: Path, opts, config: dict, env: dict) -> dict:
    out = tmp / "bare"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    result = timed([sys.executable, __file__, "--bare", str(opts.data), str(work), str(out), "--weights",
                    str(opts.weights), "--side", str(config["image_size"]), "--mean", *map(str, config["mean"]),
                    "--std", *map(str, config["std"]), "--batch", str(opts.batch), "--workers", str(opts.workers)],
                   env)
    cv = json.loads((out / "cv.json").read_text())
    return {**result, "cv": cv["cv"], "folds": cv["folds"], "sub": out}


def compare_test(a_csv: Path, b_dir: Path) -> float:
    """Largest |difference| of the test probabilities (the pipeline's submission floors at 1e-6; so does this)."""
    import numpy as np
    import pandas as pd

    sub = pd.read_csv(a_csv).set_index("id")
    ids = (b_dir / "test_ids.txt").read_text().split("\n")
    b = np.loadtxt(b_dir / "test.csv", delimiter=",")
    b = np.maximum(b, FLOOR)
    b /= b.sum(1, keepdims=True)
    return float(np.abs(sub.loc[ids].to_numpy() - b).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="B's batch (default: the one the package picks)")
    parser.add_argument("--workers", type=int, default=None, help="B's DataLoader workers (default: the package's)")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/bench_bare"))
    opts = parser.parse_args()
    if not (opts.data / "labels.csv").is_file() or not opts.weights.is_file():
        raise SystemExit(f"skipped: {opts.data} or {opts.weights} is absent")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.path.insert(0, str(ROOT))
    from pipeline.devices import CPU, available_cpus, batch_for_budget, default_workers, host_available, item_bytes

    opts.workers = default_workers(available_cpus(), CPU, 1, "files") if opts.workers is None else opts.workers
    opts.batch = opts.batch or batch_for_budget(CPU, host_available(), item_bytes(CPU, 224, workers=opts.workers), 224)
    shutil.rmtree(opts.tmp, ignore_errors=True)
    work = opts.tmp / "work"
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "reorg", SLUG, str(opts.data), str(work), "--folds",
                    str(opts.folds)], env=env, check=True)
    print(f"{SLUG}: {opts.folds}-fold frozen {MODEL}, logreg head, then the test set; B: batch {opts.batch}, "
          f"{opts.workers} worker(s); load {os.getloadavg()[0]:.2f}")
    print(f"{'run':<10} {'wall s':>8} {'cpu s':>8} {'peak GB':>8}  CV log loss")
    a_runs, b_runs = [], []
    for r in range(opts.repeat):
        a = run_pipeline(work, opts.tmp, opts, env)
        a_runs.append(a)
        print(f"A{r + 1:<9} {a['wall']:>8.1f} {a['cpu']:>8.1f} {a['peak_gb']:>8.2f}  {a['cv']:.6f}  "
              f"load {os.getloadavg()[0]:.2f}")
        b = run_bare(work, opts.tmp, opts, a["config"], env)
        b_runs.append(b)
        print(f"B{r + 1:<9} {b['wall']:>8.1f} {b['cpu']:>8.1f} {b['peak_gb']:>8.2f}  {b['cv']:.6f}  "
              f"load {os.getloadavg()[0]:.2f}")
    report(a_runs, b_runs)


def report(a_runs: list[dict], b_runs: list[dict]) -> None:
    ratios = {k: statistics.median(a[k] / b[k] for a, b in zip(a_runs, b_runs)) for k in ("wall", "cpu", "peak_gb")}
    a, b = a_runs[-1], b_runs[-1]
    print(f"median ratio A/B over the pairs: time {ratios['wall']:.2f}x (target <= 1.1), CPU {ratios['cpu']:.2f}x, "
          f"peak memory {ratios['peak_gb']:.2f}x (target <= 1.5)")
    same = abs(a["cv"] - b["cv"]) < 1e-6
    print(f"CV: A {a['cv']:.6f}, B {b['cv']:.6f}: {'identical' if same else 'DIFFERENT'} "
          f"(|diff| {abs(a['cv'] - b['cv']):.1e}); per fold A {[round(f, 5) for f in a['folds']]}, "
          f"B {[round(f, 5) for f in b['folds']]}")
    print(f"test probabilities: max |A - B| {compare_test(a['sub'], b['sub']):.1e}")
    print("A's own record: " + "; ".join(a["peaks"]))


def bare_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("raw", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--side", type=int, required=True)
    parser.add_argument("--mean", type=float, nargs=3, required=True)
    parser.add_argument("--std", type=float, nargs=3, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    o = parser.parse_args(argv)
    bare(o.raw, o.work, o.out, o.weights, o.side, tuple(o.mean), tuple(o.std), o.batch, o.workers)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        bare_main(sys.argv[2:])
    else:
        main()
