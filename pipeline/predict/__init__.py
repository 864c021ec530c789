"""Finished members to probabilities: out-of-fold CV, test predictions, blends and checked submissions."""
