"""The embedded demo: scikit-learn's bundled 8x8 handwritten digits, Kaggle-style.

``pipeline download digits RAW`` writes labels.csv (id,label), train/<id>.png,
test/<id>.png and sample_submission.csv (id,label) from the 1,797 images that
ship inside scikit-learn, so the whole chain runs with no Kaggle account and no
network. 1,497 images are labelled; 300, shuffled with a fixed seed, form the
test set.
"""
from pathlib import Path

from pipeline.competition import Competition, Recipe, register

N_TEST = 300


def write_digits(raw_dir: Path) -> None:
    """Write the Kaggle-layout download into ``raw_dir`` (idempotent)."""
    import numpy as np
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    test, train = order[:N_TEST], order[N_TEST:]
    for split in ("train", "test"):
        (raw_dir / split).mkdir(parents=True, exist_ok=True)
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    for split, idx in (("train", train), ("test", test)):
        for new_id, i in enumerate(idx, start=1):
            path = raw_dir / split / f"{new_id}.png"
            if not path.exists():
                Image.fromarray(pixels[i], mode="L").save(path)
    ids = [str(i) for i in range(1, len(train) + 1)]
    pd.DataFrame({"id": ids, "label": digits.target[train].astype(str)}).to_csv(raw_dir / "labels.csv", index=False)
    test_ids = [str(i) for i in range(1, len(test) + 1)]
    pd.DataFrame({"id": test_ids, "label": "0"}).to_csv(raw_dir / "sample_submission.csv", index=False)


DIGITS = register(
    Competition(
        slug="digits",
        title="Embedded demo: scikit-learn's 8x8 handwritten digits",
        labels_file="labels.csv",
        id_column="id",
        label_column="label",
        sample_submission="sample_submission.csv",
        submission="label",
        metric="accuracy",
        image_size=16,
        image_ext=".png",
        mean=(0.2, 0.2, 0.2),
        std=(0.35, 0.35, 0.35),
        recipe=Recipe(
            model="fastnet_s",
            epochs=10,
            batch_size=64,
            lr=0.3,
            optimizer="sgd",
            momentum=0.9,
            weight_decay=5e-4,
            schedule="onecycle",
            label_smoothing=0.1,
            augment="none",  # flipping or shifting an 8x8 digit changes what it is
        ),
        make_raw=write_digits,
    )
)
