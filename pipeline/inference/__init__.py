"""Inference: a checkpoint's full model (backbones + head) rebuilt and run on pictures."""
