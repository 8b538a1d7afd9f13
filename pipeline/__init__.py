"""Age-group estimation from face images with frozen pretrained backbones.

    from pipeline import AgeEstimator
    faces = AgeEstimator().predict("photo.jpg")   # [{box, score, landmarks, group, probabilities, age}, ...]

The subpackages are the pipeline's stages, and data flows one way:
ingest -> images -> faces -> backbones -> features -> heads -> evaluation
-> models (the shipped heads) -> inference -> explain, with `cli` on top.
A later stage may import an earlier one, never the other way round.
"""

__version__ = "0.1.0"

__all__ = ["AgeEstimator", "__version__"]


def __getattr__(name):
    # Imported on first use, so that `import pipeline` (and every command's --help) stays free of torch.
    if name == "AgeEstimator":
        from pipeline.inference.estimator import AgeEstimator

        return AgeEstimator
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
