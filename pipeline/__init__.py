"""pipeline: from a Kaggle image-classification download to a checked submission."""

__version__ = "0.1.0"
