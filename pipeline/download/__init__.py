"""A Kaggle download: fetching, unpacking, reading its layout, the spec, and reorganising it into a work folder."""
