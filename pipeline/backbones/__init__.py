"""Backbones: the frozen models' registry, their descriptors, and the PyTorch / ONNX Runtime engines."""
