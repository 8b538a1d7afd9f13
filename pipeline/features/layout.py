"""The names of the feature file's HDF5 layout, shared by its writer and its reader."""

from __future__ import annotations

import h5py

FORMAT = "utkface-age-features/1"


META_COLUMNS = ("path", "age", "gender", "race", "group", "split", "sha256")   # every file has these


# Written only when a label source gives them (labels.py); files without them stay readable.
# subject [N] utf-8 ('' = none), box [N, 4] float32 x,y,w,h and eyes [N, 4] float32 (NaN = not given).
OPTIONAL_META_COLUMNS = ("subject", "box", "eyes")


STR_DTYPE = h5py.string_dtype("utf-8")


# Part arrays named row.<group>.<name> (extract.run: the face record of each kept image) become the
# dataset /<group>/<name> of the final file, one row per kept image, beside the features.
ROW_ARRAY_PREFIX = "row."


ROW_GROUPS = ("faces",)   # groups of such per-row arrays that merge and join carry over
