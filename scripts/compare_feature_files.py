"""Compare two feature files: every dataset byte for byte, every attribute as text.

    python scripts/compare_feature_files.py A.h5 B.h5

The root attributes that name the run itself (`created`, `data_dir`) are reported but do not
count as differences. Exit 0 when the files hold the same features, metadata and settings.
"""

import sys

import h5py
import numpy as np

RUN_ATTRIBUTES = {"created", "data_dir"}


def same_dataset(x: h5py.Dataset, y: h5py.Dataset) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    a, b = np.asarray(x[()]), np.asarray(y[()])
    if a.dtype == object:  # variable-length strings: compare the values, not the pointers
        return list(a.ravel()) == list(b.ravel())
    return a.tobytes() == b.tobytes()


def compare(path_a: str, path_b: str) -> int:
    differences = 0
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        names_a, names_b = [], []
        a.visit(names_a.append)
        b.visit(names_b.append)
        for name in sorted(set(names_a) ^ set(names_b)):
            print(f"only in one file: {name}")
            differences += 1
        datasets = 0
        for name in sorted(set(names_a) & set(names_b)):
            x, y = a[name], b[name]
            if isinstance(x, h5py.Dataset):
                datasets += 1
                if not same_dataset(x, y):
                    print(f"dataset differs: {name}")
                    differences += 1
            for key in sorted(set(x.attrs) | set(y.attrs)):
                if str(x.attrs.get(key)) != str(y.attrs.get(key)):
                    print(f"attribute differs: {name} {key}")
                    differences += 1
        for key in sorted(set(a.attrs) | set(b.attrs)):
            if str(a.attrs.get(key)) != str(b.attrs.get(key)):
                note = " (names the run, not counted)" if key in RUN_ATTRIBUTES else ""
                print(f"root attribute differs: {key}{note}")
                differences += key not in RUN_ATTRIBUTES
    print(f"{datasets} datasets compared, {differences} differences")
    return differences


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(1 if compare(sys.argv[1], sys.argv[2]) else 0)
