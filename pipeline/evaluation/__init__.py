"""Evaluation: metrics on cached features, comparison tables and figures."""
