"""Age-group estimation from face images with frozen pretrained backbones.

Data flows one way: ingest (dataset) -> decode -> backbones -> store ->
heads -> metrics / cam. A later stage may import an earlier one, never the
other way round.
"""

__version__ = "0.1.0"
