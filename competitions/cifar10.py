"""Kaggle "CIFAR-10 - Object Recognition in Images" (kaggle.com/c/cifar-10).

50,000 labelled 32x32 PNGs, 300,000 test PNGs; the submission names one class
per id and is scored by accuracy. Default recipe: the d2l chapter's 32x32
ResNet-18 with SGD, momentum 0.9, weight decay 5e-4, batch 256, pad-4 crop and
flip. Named recipes (`--recipe`):
- fast: FastNet (whitened stem, BN conv groups, scaled logits) with Nesterov
  SGD, a one-cycle schedule, label smoothing 0.2 and flip TTA, after the
  published CIFAR-10 speed runs (their shifted views, --tta flipshift, won
  +0.009 [+0.001, +0.017] on CIFAR 2,000 at 10 epochs but +0.001 [-0.008,
  +0.010] at the 15 that small data now gets, for 27% more time: not default);
- resnet18: the same ResNet-18 trained the modern way (Nesterov, one-cycle,
  label smoothing, larger batches, flip TTA).
"""
from pipeline.competition import SPEED_RUN, Competition, Recipe, register

CIFAR10 = register(
    Competition(
        slug="cifar-10",
        title="CIFAR-10 - Object Recognition in Images",
        labels_file="trainLabels.csv",
        id_column="id",
        label_column="label",
        sample_submission="sampleSubmission.csv",
        submission="label",
        metric="accuracy",
        image_size=32,
        image_ext=".png",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        recipe=Recipe(
            model="resnet18_cifar",
            epochs=30,
            batch_size=256,
            lr=0.1,
            optimizer="sgd",
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            warmup_epochs=1,
            augment="pad_crop_flip",
        ),
        recipes={
            "fast": Recipe(**SPEED_RUN),
            "resnet18": Recipe(model="resnet18_cifar", epochs=30, batch_size=512, lr=0.2, optimizer="sgd",
                               momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
                               label_smoothing=0.1, augment="pad_crop_flip", tta="flip"),
        },
    )
)
