"""The pipeline against a bare hand-written script doing the same computation, run in turn (A B A B ...).

    python benchmarks/bench_bare.py [--repeat 2] [--data DIR] [--weights FILE] [--folds 3]
    python benchmarks/bench_bare.py --part fast [--repeat 2] [--images 2000] [--epochs 3]

A (the pipeline, through its CLI, as a user runs it): the dog recipe's K-fold
frozen-backbone run and its test predictions in one process,

    pipeline train dog-breed-identification WORK RUN --folds K --model timm:tf_efficientnet_lite0
        --weights FILE --feature-views 0 --class-prior off --device cpu --predict OUT.csv

(``--class-prior off``: B fits the plain logistic regression; the prior is measured in bench_quality.py.)

B (this file's ``--bare`` mode, which imports nothing of the package): the same
computation written out by hand with timm, albumentations and scikit-learn:
decode each image once (JPEG draft mode where it can shrink, as the package
does), the eval transform, the backbone's pooled features of every labelled
and test image in batches of the size the package picks on a CPU, then per
fold a logistic regression on standardised features with C chosen by an
inner K-fold CV on the training fold (absent classes get a low bias), the
out-of-fold probabilities (floored at 1e-6, as the submission) and the test
probabilities averaged over the folds' heads. Both read the same folds.csv.

``--part fast``: the fast recipe's training steps. A: ``pipeline train cifar-10
WORK RUN --recipe fast --epochs E --device cpu`` on a CIFAR-10 subset (N
training images from ../shared/data/cifar-10-jpeg); B (``--bare-fast``): the same
loop by hand: the images decoded once into a uint8 tensor, batches cut from it
with a random translation and flip, FastNet written out (stem, three conv
groups, max pooling, logits x 1/9, the stem whitened from the first batch),
Nesterov SGD without weight decay on norms and biases, the one-cycle lr,
label smoothing, flip TTA on the validation images each epoch; with the batch,
lr and epochs A's run resolved (read from its config.json). The augmentation
draws differ, so the accuracies agree only within noise: the figure is the time.

Each run is a fresh process with a fresh feature cache; wall time, CPU time
(user + system, with its children) and peak RSS (the largest process, from
wait4) are taken by this driver. Prints every run, the medians, the ratios
A/B and whether the CV log loss and the test probabilities agree. Targets
(issue 26): time <= 1.1x, peak memory <= 1.5x, identical CV.
"""
from __future__ import annotations

import argparse
import json
import math
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


def features(paths: list[str], side: int, mean, std, weights: Path, batch: int, workers: int,
             channels_last: bool = False):
    """Pooled pre-logits features (N, F) float32 of the images; eval transform: short side to side*256/224,
    centre crop; in channels_last memory format where the package's device plan uses it."""
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
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    out = []
    with torch.no_grad():
        for x in torch.utils.data.DataLoader(Images(), batch_size=batch, num_workers=workers):
            x = x.contiguous(memory_format=fmt)
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


def bare(raw: Path, work: Path, out: Path, weights: Path, side: int, mean, std, batch: int, workers: int,
         channels_last: bool) -> None:
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
    x = features([str(raw / "train" / f"{i}.jpg") for i in ids], side, mean, std, weights, batch, workers,
                 channels_last)
    x_test = features([str(raw / "test" / f"{i}.jpg") for i in test_ids], side, mean, std, weights, batch, workers,
                      channels_last)
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


# ---------------------------------------------------------------- B: the fast recipe's loop (no package imports)


def bare_fast(work: Path, out: Path, batch: int, lr: float, epochs: int, mean, std, channels_last: bool = False,
              seed: int = 0) -> None:
    import math

    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    torch.manual_seed(seed)

    def load(split: str):
        classes = sorted(p.name for p in (work / split).iterdir() if p.is_dir())
        files = [(f, k) for k, c in enumerate(classes) for f in sorted((work / split / c).iterdir())]
        x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files]))
        return x.permute(0, 3, 1, 2).contiguous(), torch.tensor([k for _, k in files]), len(classes)

    xtr, ytr, k = load("train")
    xva, yva, _ = load("valid")
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    sd = torch.tensor(std).view(1, 3, 1, 1) * 255

    def conv_bn(a, b):
        return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.GELU()]

    def group(a, b):
        first = conv_bn(a, b)
        return nn.Sequential(first[0], nn.MaxPool2d(2), *first[1:], *conv_bn(b, b))

    net = nn.Sequential(nn.Sequential(*conv_bn(3, 32)), group(32, 64), group(64, 256), group(256, 256),
                        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(256, k))
    # the classifier keeps torch's init, as the package's model trained from scratch does (a zero start is for
    # heads on pretrained backbones: here it starved the convolutions of gradient, 0.36 against 0.60 in 8 epochs)
    fmt = torch.channels_last if channels_last else torch.contiguous_format  # as A's device plan decided
    gen = torch.Generator().manual_seed(seed)

    def crop_flip(x):  # a random shift by up to h/8 px (zero padding) and a flip, by indexing the padded batch
        b, _, h, w = x.shape
        pad = h // 8
        padded = nn.functional.pad(x, (pad, pad, pad, pad))
        dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
        flip = torch.rand(b, generator=gen) < 0.5
        rows = torch.arange(h)[None, :] + dy[:, None]
        cols = torch.arange(w)[None, :].expand(b, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
        return padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    order = torch.randperm(len(xtr), generator=gen)
    with torch.no_grad():  # whiten the stem from the first batch's 3x3 patches
        first = (xtr[order[:batch]].float() - m) / sd
        patches = first.unfold(2, 3, 1).unfold(3, 3, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 27).double()
        patches -= patches.mean(0)
        val, vec = torch.linalg.eigh(patches.T @ patches / len(patches))
        filt = (vec.T / (val + 5e-4).sqrt()[:, None]).flip(0)[:16].reshape(16, 3, 3, 3).float()
        net[0][0].weight.copy_(torch.cat([filt, -filt]))
    net.to(memory_format=fmt)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    rest = [p for n, p in net.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, momentum=0.85, nesterov=True)
    steps = len(xtr) // batch
    total, peak = steps * epochs, max(1, int(0.3 * steps * epochs))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    step, accs = 0, []
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            f = 0.04 + 0.96 * step / peak if step < peak else \
                0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total - peak))) + 1e-4
            for g in opt.param_groups:
                g["lr"] = lr * f
            x = ((crop_flip(xtr[idx].float()) - m) / sd).contiguous(memory_format=fmt)
            loss = loss_fn(net(x) / 9, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        net.eval()
        with torch.no_grad():
            x = ((xva.float() - m) / sd).contiguous(memory_format=fmt)
            p = torch.softmax(net(x) / 9, 1) + torch.softmax(net(x.flip(3)) / 9, 1)
        accs.append(float((p.argmax(1) == yva).float().mean()))
    (out / "fast.json").write_text(json.dumps({"valid_accuracy": accs}))


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
                    "--class-prior", "off", "--device", "cpu", "--predict", str(out)], env)
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
                    "--std", *map(str, config["std"]), "--batch", str(opts.batch), "--workers", str(opts.workers),
                    "--channels-last", str(int(opts.channels_last))],
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
    parser.add_argument("--part", choices=("dog", "fast"), default="dog")
    parser.add_argument("--images", type=int, default=2000, help="--part fast: CIFAR-10 training images")
    parser.add_argument("--epochs", type=int, default=3, help="--part fast: epochs of both")
    opts = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if opts.part == "fast":
        shutil.rmtree(opts.tmp, ignore_errors=True)
        return fast_main(opts, env)
    if not (opts.data / "labels.csv").is_file() or not opts.weights.is_file():
        raise SystemExit(f"skipped: {opts.data} or {opts.weights} is absent")
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline.devices import (CPU, available_cpus, batch_for_budget, default_workers, host_available, item_bytes,
                                  probe, use_channels_last)

    opts.workers = default_workers(available_cpus(), CPU, 1, "files") if opts.workers is None else opts.workers
    opts.channels_last = use_channels_last(None, probe(torch.device("cpu")), 4)  # the backbone pass's format
    opts.batch = opts.batch or batch_for_budget(CPU, host_available(), item_bytes(CPU, 224, workers=opts.workers), 224)
    shutil.rmtree(opts.tmp, ignore_errors=True)
    work = opts.tmp / "work"
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "reorg", SLUG, str(opts.data), str(work), "--folds",
                    str(opts.folds)], env=env, check=True)
    print(f"{SLUG}: {opts.folds}-fold frozen {MODEL}, logreg head, then the test set; B: batch {opts.batch}, "
          f"{opts.workers} worker(s), channels_last {opts.channels_last}; load {os.getloadavg()[0]:.2f}")
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
    parser.add_argument("--channels-last", type=int, required=True)
    o = parser.parse_args(argv)
    bare(o.raw, o.work, o.out, o.weights, o.side, tuple(o.mean), tuple(o.std), o.batch, o.workers, bool(o.channels_last))


def fast_main(opts, env: dict) -> None:
    """A/B of the fast recipe's training on a CIFAR-10 subset (see the module's docstring)."""
    import pandas as pd
    from PIL import Image

    cifar = SHARED / "data" / "cifar-10-jpeg"
    if not (cifar / "trainLabels.csv").is_file():
        raise SystemExit(f"skipped: {cifar} is absent")
    raw, work = opts.tmp / "cifar-raw", opts.tmp / "cifar-work"
    labels = pd.read_csv(cifar / "trainLabels.csv").sample(opts.images + 10, random_state=0)
    for sub in ("train", "test"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(labels.itertuples()):
        name = raw / ("train" if i < opts.images else "test") / f"{row.id}.png"
        Image.open(cifar / "train" / f"{row.id}.jpg").convert("RGB").save(name)
    labels[:opts.images].to_csv(raw / "trainLabels.csv", index=False)
    pd.DataFrame({"id": labels["id"][opts.images:], "label": "cat"}).to_csv(raw / "sampleSubmission.csv",
                                                                           index=False)
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "reorg", "cifar-10", str(raw), str(work), "--folds",
                    "0"], env=env, check=True)
    print(f"cifar-10 {opts.images} images, --recipe fast --epochs {opts.epochs}, holdout; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'run':<10} {'wall s':>8} {'cpu s':>8} {'peak GB':>8}  valid accuracy (last epoch)")
    a_runs, b_runs = [], []
    for r in range(opts.repeat):
        run, out = opts.tmp / "fast-run", opts.tmp / "fast-bare"
        for path in (run, out, work / "cache"):
            shutil.rmtree(path, ignore_errors=True)
        out.mkdir()
        a = timed([sys.executable, "-m", "pipeline", "-q", "train", "cifar-10", str(work), str(run), "--recipe",
                   "fast", "--epochs", str(opts.epochs), "--device", "cpu"], env)
        member = json.loads((run / "holdout" / "config.json").read_text())  # the member's: as adapted
        cfg, nhwc = member["config"], member["device"]["channels_last"]
        a["acc"] = float(pd.read_csv(run / "holdout" / "metrics.csv")["valid_accuracy"].iloc[-1])
        a_runs.append(a)
        print(f"A{r + 1:<9} {a['wall']:>8.1f} {a['cpu']:>8.1f} {a['peak_gb']:>8.2f}  {a['acc']:.3f}  "
              f"load {os.getloadavg()[0]:.2f}")
        b = timed([sys.executable, __file__, "--bare-fast", str(work), str(out), str(cfg["batch_size"]),
                   str(cfg["lr"]), str(cfg["epochs"]), *map(str, cfg["mean"]), *map(str, cfg["std"]),
                   str(int(nhwc))], env)
        b["acc"] = json.loads((out / "fast.json").read_text())["valid_accuracy"][-1]
        b_runs.append(b)
        print(f"B{r + 1:<9} {b['wall']:>8.1f} {b['cpu']:>8.1f} {b['peak_gb']:>8.2f}  {b['acc']:.3f}  "
              f"load {os.getloadavg()[0]:.2f}  (batch {cfg['batch_size']}, lr {cfg['lr']:.4g})")
    ratios = {k: statistics.median(a[k] / b[k] for a, b in zip(a_runs, b_runs)) for k in ("wall", "cpu", "peak_gb")}
    print(f"median ratio A/B over the pairs: time {ratios['wall']:.2f}x, CPU {ratios['cpu']:.2f}x, "
          f"peak memory {ratios['peak_gb']:.2f}x")
    n_valid = int((pd.read_csv(work / "items.csv")["split"] == "valid").sum())
    acc_a, acc_b = (statistics.mean(r["acc"] for r in runs) for runs in (a_runs, b_runs))
    # the augmentation draws differ, so the two agree only as two samples of one accuracy can: the difference
    # of the mean accuracies against its 95% interval (binomial, n_valid images per run, opts.repeat runs each)
    half = 1.96 * math.sqrt((acc_a * (1 - acc_a) + acc_b * (1 - acc_b)) / (n_valid * opts.repeat))
    verdict = "agree within noise" if abs(acc_a - acc_b) <= half else "DIFFER beyond noise"
    print(f"valid accuracy (mean of {opts.repeat}, {n_valid} images): A {acc_a:.3f}, B {acc_b:.3f}, difference "
          f"{acc_a - acc_b:+.3f} (95% interval +-{half:.3f}): {verdict}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"]:
        bare_main(sys.argv[2:])
    elif sys.argv[1:2] == ["--bare-fast"]:
        w, o, bs, lr, ep, *ms = sys.argv[2:]
        bare_fast(Path(w), Path(o), int(bs), float(lr), int(ep), tuple(map(float, ms[:3])), tuple(map(float, ms[3:6])),
                  bool(int(ms[6])))
    else:
        main()
