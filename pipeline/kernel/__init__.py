"""Offline Kaggle kernels: the dataset, the script and their metadata."""
