"""Every shipped model (pipeline/models): complete, small, described by its card, and right on sample faces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.files import file_sha256
from pipeline.models import DEFAULT_MODEL, MODELS, resolve_checkpoint
from tests.support.paths import REPO

SAMPLE = REPO / "sample" / "utkface"
EDGES = [25, 50, 75, 116]


def weights_reason() -> str | None:
    home = os.environ.get("TORCH_HOME")
    if not home or not (Path(home) / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file():
        return "needs torchvision's MobileNetV2 ImageNet file in TORCH_HOME/hub/checkpoints (set TORCH_HOME)"
    return None


def test_the_default_model_is_registered_and_resolves_by_name_or_by_none():
    assert DEFAULT_MODEL in MODELS
    assert resolve_checkpoint(None) == resolve_checkpoint(DEFAULT_MODEL) == MODELS[DEFAULT_MODEL]
    with pytest.raises(ValueError, match="no shipped model is called"):
        from pipeline.models import model_folder

        model_folder("nope")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shipped_model_is_complete_small_and_its_card_matches_its_files(name):
    from pipeline.heads.checkpoint import load_checkpoint
    from pipeline.inference.framing import head_framing

    folder = MODELS[name]
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    assert {"head.safetensors", "head.json", "MODEL_CARD.md", "test_files.txt"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) < 8 * 2**20          # a few MB
    ckpt = load_checkpoint(folder)                                            # loads, identity checked
    meta = ckpt.meta
    assert head_framing(meta) == "detect"                                     # trained and used on cut-out faces
    card = files["MODEL_CARD.md"].read_text()
    for backbone, digest in meta["weights_sha256"].items():
        assert digest in card, f"the card does not quote the {backbone} weights' sha256"
    assert file_sha256(files["test_files.txt"]) in card
    names = files["test_files.txt"].read_text().split("\n")[:-1]
    assert names and all("/" not in n and n.endswith(".jpg") for n in names)  # names only
    assert len(names) == meta["rows"]["test"] == len(set(names))
    assert "non-commercial" in card.lower()


@pytest.mark.slow
@pytest.mark.skipif(weights_reason() is not None, reason=str(weights_reason()))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_shipped_model_labels_its_sample_test_faces(name):
    """The sample faces in the model's own test split: each found once, most in the right group."""
    from pipeline import AgeEstimator

    tested = set(MODELS[name].joinpath("test_files.txt").read_text().split())
    faces = sorted(p for p in SAMPLE.glob("*.jpg") if p.name in tested)
    assert len(faces) >= 5, "too few sample faces in this model's test split to check it"
    results = AgeEstimator(name, device="cpu").predict(faces)
    found = [(p, r[0]) for p, r in zip(faces, results) if r]
    assert len(found) >= 0.9 * len(faces)
    truth = [next(i for i, edge in enumerate(EDGES) if int(p.name.split("_")[0]) <= edge) for p, _ in found]
    groups = [list(face["probabilities"]).index(face["group"]) for _, face in found]
    accuracy = sum(t == g for t, g in zip(truth, groups)) / len(found)
    assert accuracy >= 0.5, f"{accuracy:.2f} on {len(found)} sample test faces"
    assert json.loads(json.dumps(results)) == results                         # plain JSON-able values
