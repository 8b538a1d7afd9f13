"""Age-group estimation from face images with frozen pretrained backbones.

The subpackages are the pipeline's stages, and data flows one way:
ingest -> images -> faces -> backbones -> features -> heads -> evaluation
-> inference -> explain, with `cli` on top. A later stage may import an
earlier one, never the other way round.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
