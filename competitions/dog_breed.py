"""Kaggle "Dog Breed Identification" (kaggle.com/c/dog-breed-identification).

10,222 labelled JPEGs of 120 breeds; the submission holds one softmax
probability column per breed, in the sample submission's order, and is scored
by multi-class log loss. Recipe: the d2l chapter's ImageNet ResNet-34 with a
frozen backbone; the head is a logistic regression on the cached features
(``head="logreg"``, C by inner CV): on the 300 shared images with Lite0 weights
and 3 folds it scored CV log loss 1.90 where the chapter's Linear(512, 256) ->
ReLU -> Linear(256, 120) head (SGD lr 0.03, momentum 0.9, weight decay 1e-4,
20 epochs, lr x0.1 every 10 epochs, still set below for ``--head mlp``)
scored 2.27 (benchmarks/bench_quality.py). Both are without the class prior
(``--class-prior``, on by default): 119 of the 120 breeds are ImageNet classes
by name, and the logreg head fitted around the pretrained classifier's rows
scores CV log loss 0.31.
"""
from pipeline.competition import Competition, Recipe, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DOG_BREED = register(
    Competition(
        slug="dog-breed-identification",
        title="Dog Breed Identification",
        labels_file="labels.csv",
        id_column="id",
        label_column="breed",
        sample_submission="sample_submission.csv",
        submission="probs",
        metric="log_loss",
        image_size=224,
        image_ext=".jpg",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        recipe=Recipe(
            model="resnet34",
            pretrained=True,
            epochs=20,
            batch_size=128,
            lr=0.03,
            optimizer="sgd",
            momentum=0.9,
            weight_decay=1e-4,
            schedule="step",
            lr_period_epochs=10,
            lr_decay=0.1,
            augment="resized_crop_flip_jitter",
            freeze_backbone=True,
            head="logreg",
            head_hidden=256,
        ),
    )
)
