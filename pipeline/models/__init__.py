"""Heads that ship with the package, by name: predict and AgeEstimator use DEFAULT_MODEL when given no checkpoint.

Each model is a folder beside this file holding head.safetensors, head.json, MODEL_CARD.md (what it was trained
on, how, how well it does, the backbone weights it needs) and test_files.txt (the UTKFace files it was tested
on). scripts/build_default_model.sh rebuilds them from UTKFace.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> folder; the name is what `predict -c NAME` and AgeEstimator("NAME") accept.
MODELS: dict[str, Path] = {
    "mobilenet_v2-utkface-faces": HERE / "mobilenet_v2_utkface_faces",
}

DEFAULT_MODEL = "mobilenet_v2-utkface-faces"


def model_folder(name: str) -> Path:
    """The folder of the shipped model called `name`; a ValueError naming the models for an unknown one."""
    if name not in MODELS:
        raise ValueError(f"no shipped model is called {name!r}; the shipped models are {', '.join(MODELS)}")
    return MODELS[name]


def resolve_checkpoint(name_or_folder: str | Path | None) -> Path:
    """A head folder for `name_or_folder`: a shipped model's name, a checkpoint folder (or a file in one), or
    None for the default model. An existing path wins over a model of the same name."""
    if name_or_folder is None:
        return model_folder(DEFAULT_MODEL)
    path = Path(name_or_folder)
    if path.exists() or str(name_or_folder) not in MODELS:
        return path
    return model_folder(str(name_or_folder))
