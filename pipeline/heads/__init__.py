"""Heads: the classifier head, its checkpoint and training data, the stacked trainer, targets and recipes."""
