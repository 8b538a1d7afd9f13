"""Package a trained head as a shipped model (scripts/build_default_model.sh runs this).

    python -m pipeline.models.build FEATURES.h5 HEAD_DIR [HEAD_DIR...] --into pipeline/models/FOLDER

Picks the head with the best validation accuracy, copies it into the model folder with the sha256 of each
backbone weights file it needs (checked at load, backbones/weights_hash.py) and writes test_files.txt (the
feature file's test split, file names only). Prints the hashes the model card quotes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from pipeline.files import file_sha256, write_bytes_atomically, write_json_atomically


def split_names(features: Path) -> dict[str, list[str]]:
    """{split: sorted file names} of a feature file."""
    from pipeline.features.read import read_meta

    meta = read_meta(features)
    names: dict[str, list[str]] = {}
    for path, split in zip(meta["path"], meta["split"]):
        names.setdefault(str(split), []).append(Path(str(path)).name)
    return {split: sorted(files) for split, files in names.items()}


def split_digest(splits: dict[str, list[str]]) -> str:
    """sha256 of the whole split as sorted 'file,split' lines: the same split gives the same digest anywhere."""
    lines = sorted(f"{name},{split}\n" for split, files in splits.items() for name in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def best_head(heads: list[Path]) -> Path:
    """The head whose head.json records the best validation accuracy (the first of equals)."""
    scored = [(json.loads((head / "head.json").read_text())["metrics"]["val_acc"], -i, head)
              for i, head in enumerate(heads)]
    return max(scored)[2]


def package(features: Path, head: Path, into: Path) -> dict:
    """Copy `head` into `into` as a shipped model; returns the hashes and counts the card quotes."""
    from pipeline.backbones.weights_hash import checkpoint_path

    meta = json.loads((head / "head.json").read_text())
    hashes = {}
    for backbone in meta["backbones"]:
        path = checkpoint_path(backbone, str(meta["weights"][backbone]))
        if path is None or not path.is_file():
            raise SystemExit(f"the {backbone} weights file {path} is not here; set TORCH_HOME")
        hashes[backbone] = file_sha256(path)
    meta["weights_sha256"] = hashes
    meta["feature_file"] = Path(meta["feature_file"]).name  # where it was made says nothing to a user
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(head / "head.safetensors", into / "head.safetensors")
    write_json_atomically(into / "head.json", meta)
    splits = split_names(features)
    write_bytes_atomically(into / "test_files.txt", "".join(f"{n}\n" for n in splits["test"]).encode())
    return {"head": str(head), "recipe": meta["config"].get("recipe"), "val_acc": meta["metrics"]["val_acc"],
            "weights_sha256": hashes, "split_sha256": split_digest(splits),
            "test_files_sha256": file_sha256(into / "test_files.txt"),
            "rows": {split: len(files) for split, files in splits.items()},
            "size_bytes": sum(p.stat().st_size for p in into.iterdir() if p.is_file())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("features", type=Path)
    parser.add_argument("heads", type=Path, nargs="+")
    parser.add_argument("--into", type=Path, required=True)
    args = parser.parse_args()
    summary = package(args.features, best_head(args.heads), args.into)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
