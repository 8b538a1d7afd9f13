"""Features: the featurize job and the HDF5 feature file (settings, parts, writer, combine, read, verify)."""
