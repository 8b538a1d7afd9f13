"""A head's header is range-checked at every load and its weights carry a digest; a temperature fitted on
too few validation rows is warned about."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.heads.calibration import CalibrationWarning, fit_temperature
from pipeline.heads.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_digest
from pipeline.heads.model import AgeHead

EDGES = [25, 50, 75, 116]


def saved_head(folder, temperature: float = 2.0):
    torch.manual_seed(0)
    head = AgeHead(6, (8,)).eval()
    head.feature_std.uniform_(0.5, 2.0)
    head.calibration_temperature.fill_(temperature)
    meta = {"backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": "none"}, "feature_kind": "last",
            "feature_dim": 6, "hidden": [8], "group_edges": EDGES, "class_names": ["0-25", "26-50", "51-75", "76-116"],
            "target": "group", "calibration": {"method": "temperature", "temperature": temperature}}
    save_checkpoint(folder, head, meta)
    return head


def rewrite(folder, change_state, change_meta=None, reseal: bool = True) -> None:
    """Edit both head files consistently, as someone who also rewrites the digests would (reseal), or not."""
    with safe_open(str(folder / "head.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    change_state(state)
    meta = json.loads((folder / "head.json").read_text())
    if change_meta:
        change_meta(meta)
    if reseal:
        metadata["head_sha256"] = meta["head_sha256"] = state_digest(state)
    save_file(state, str(folder / "head.safetensors"), metadata=metadata)
    (folder / "head.json").write_text(json.dumps(meta))


def test_a_huge_temperature_in_both_files_is_refused(tmp_path):
    saved_head(tmp_path)
    load_checkpoint(tmp_path)

    def huge(state):
        state["calibration_temperature"].fill_(1e30)

    def huge_meta(meta):
        meta["calibration"]["temperature"] = 1e30
    rewrite(tmp_path, huge, huge_meta)
    with pytest.raises(CheckpointError, match=r"calibration temperature 1e\+30 is outside \[0.01, 100\]"):
        load_checkpoint(tmp_path)


def test_a_zero_feature_std_is_refused(tmp_path):
    saved_head(tmp_path)

    def zero(state):
        state["feature_std"][2] = 0.0
    rewrite(tmp_path, zero)
    with pytest.raises(CheckpointError, match="feature_std is not 6 positive values"):
        load_checkpoint(tmp_path)


def test_negated_weights_are_refused_by_their_digest(tmp_path):
    head = saved_head(tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.meta["head_sha256"] == state_digest({k: v for k, v in head.state_dict().items()})

    def negate(state):
        for name in state:
            if name.startswith("mlp."):
                state[name].mul_(-1)
    rewrite(tmp_path, negate, reseal=False)
    with pytest.raises(CheckpointError, match="weights were changed after training"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("field, value, named", [
    ("feature_dim", 0, "feature_dim 0"),
    ("group_edges", [50, 25, 75, 116], "group_edges"),
    ("hidden", [-8], "hidden"),
])
def test_other_header_values_out_of_range_are_one_line(tmp_path, field, value, named):
    """Range-checked also in a head saved before head.safetensors repeated its identity (which would catch it)."""
    saved_head(tmp_path)
    with safe_open(str(tmp_path / "head.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: v for k, v in f.metadata().items() if k != "identity"}
    save_file(state, str(tmp_path / "head.safetensors"), metadata=metadata)
    meta = json.loads((tmp_path / "head.json").read_text())
    meta[field] = value
    (tmp_path / "head.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(tmp_path)


def test_a_temperature_fitted_on_too_few_rows_is_warned_about():
    torch.manual_seed(0)
    groups = torch.arange(200) % 4
    scores = torch.randn(200, 4) + 3 * torch.nn.functional.one_hot(groups, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_temperature(scores, groups)   # enough rows: no warning
    with pytest.warns(CalibrationWarning, match="fitted on only 1 validation row"):
        fit_temperature(scores[:1], groups[:1])
