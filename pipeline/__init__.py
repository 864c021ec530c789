"""pipeline: from a Kaggle image-classification download to a checked submission."""
import os

__version__ = "0.1.0"

# albumentations asks PyPI for a newer release on every import (a 2 s timeout without a network, in every
# process and DataLoader worker): the tool never phones home on its own. A user's own setting is kept.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
