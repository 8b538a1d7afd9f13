"""Feature files are bound to their content: the weights' bytes, their settings and their labels."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.backbones.registry import get_spec
from pipeline.cli.featurize import main as featurize_cli
from pipeline.features.read import read_features, read_meta, read_settings
from pipeline.features.settings import WEIGHTS_SHA256
from tests.support.folders import write_utk_folder
from tests.support.synthetic import make_feature_file


def invoke(*args):
    return CliRunner().invoke(featurize_cli, [str(a) for a in args])


@pytest.mark.slow
def test_a_checkpoint_replaced_under_the_same_name_changes_the_fingerprint_and_merge_refuses(
        tmp_path, monkeypatch, calibrated_mobilenet):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))   # torch.hub.get_dir() follows it
    checkpoint = (tmp_path / "torch" / "hub" / "checkpoints"
                  / Path(get_spec("mobilenet_v2").weights_enum.IMAGENET1K_V1.url).name)
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(calibrated_mobilenet, checkpoint)   # torchvision loads it as IMAGENET1K_V1
    data = tmp_path / "utk"
    write_utk_folder(data, [5, 30, 55, 80])
    common = ["--backbones", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--engine", "torch", "--device", "cpu",
              "--decoder", "torch", "--quiet"]
    first = invoke(data, "-o", tmp_path / "f.h5", "--shard", "0/2", *common)
    assert first.exit_code == 0, first.output

    state = torch.load(calibrated_mobilenet, weights_only=True)
    for value in state.values():
        if value.is_floating_point():
            value.mul_(-1)
    torch.save(state, checkpoint)   # other weights, same name, same id
    second = invoke(data, "-o", tmp_path / "f.h5", "--shard", "1/2", *common)
    assert second.exit_code == 0, second.output

    shards = [tmp_path / "f.shard-0-of-2.h5", tmp_path / "f.shard-1-of-2.h5"]
    one, two = (read_settings(s) for s in shards)
    assert one["weights"] == two["weights"] == {"mobilenet_v2": "IMAGENET1K_V1"}
    assert one[WEIGHTS_SHA256] != two[WEIGHTS_SHA256] and one["fingerprint"] != two["fingerprint"]
    merged = invoke("merge", *shards, "-o", tmp_path / "merged.h5")
    assert merged.exit_code == 1 and WEIGHTS_SHA256 in merged.output, merged.output
    assert "Traceback" not in merged.output and not (tmp_path / "merged.h5").exists()


def test_edited_settings_are_refused_on_read(tmp_path):
    path = make_feature_file(tmp_path / "f.h5", n=40, widths={"mobilenet_v2": (8, 4)})
    assert read_settings(path)["group_edges"] == [25, 50, 75, 116]
    with h5py.File(path, "r+") as h5:
        settings = json.loads(h5.attrs["settings"])
        settings["group_edges"] = [30, 116]   # valid JSON, other bins
        h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
    with pytest.raises(ValueError, match="'settings' attribute was changed after the file was written"):
        read_settings(path)
    info = invoke("info", path)
    assert info.exit_code == 1 and "changed after the file was written" in info.output, info.output


def test_an_edited_meta_age_is_refused_by_readers_and_merge(tmp_path):
    path = make_feature_file(tmp_path / "f.h5", n=40, widths={"mobilenet_v2": (8, 4)})
    read_meta(path)
    with h5py.File(path, "r+") as h5:
        ages = h5["meta/age"][()]
        ages[3] += 40
        h5["meta/age"][...] = ages
    with pytest.raises(ValueError, match="meta/age changed after the file was written"):
        read_meta(path)
    assert read_features(path, "mobilenet_v2").shape == (40, 2, 8)   # the features themselves are still read


@pytest.mark.slow
def test_verify_catches_an_edited_meta_age(tmp_path, calibrated_mobilenet):
    data = tmp_path / "utk"
    write_utk_folder(data, [5, 30, 55, 80])
    out = tmp_path / "f.h5"
    made = invoke(data, "-o", out, "--backbones", "mobilenet_v2", "--weights", calibrated_mobilenet,
                  "--engine", "torch", "--device", "cpu", "--decoder", "torch", "--quiet")
    assert made.exit_code == 0, made.output
    weights = ["--weights", f"mobilenet_v2={calibrated_mobilenet}"]
    clean = invoke("verify", out, "--data", data, *weights)
    assert clean.exit_code == 0, clean.output
    with h5py.File(out, "r+") as h5:
        ages = h5["meta/age"][()]
        h5["meta/age"][...] = np.where(ages == 30, 70, ages)
    edited = invoke("verify", out, "--data", data, *weights)
    assert edited.exit_code != 0 and "meta/age changed after the file was written" in edited.output, edited.output


@pytest.mark.parametrize("kind", ["fifo", "device link"])
def test_info_on_a_fifo_or_a_link_to_a_device_says_what_it_is(tmp_path, kind):
    path = tmp_path / "features.h5"
    if kind == "fifo":
        os.mkfifo(path)
        expected = "is a FIFO, not a file"
    else:
        os.symlink("/dev/null", path)
        expected = "is a character device (through a symbolic link), not a file"
    result = invoke("info", path)
    assert result.exit_code == 1 and expected in result.output and "does not exist" not in result.output, \
        result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_features_of_other_widths_are_refused_before_a_batch_is_saved(utk_folder, tmp_path, monkeypatch, fast):
    """An engine whose graph is another backbone's: one line, and no wrong batch left for a rerun to resume."""
    from pipeline.features import extract

    real = extract.BackboneRunner.__call__

    def other_widths(self, views):
        return {name: {k: v[..., :-8] for k, v in outputs.items()} for name, outputs in real(self, views).items()}
    monkeypatch.setattr(extract.BackboneRunner, "__call__", other_widths)
    result = invoke(utk_folder, "-o", tmp_path / "f.h5", *fast, "--engine", "torch", "--device", "cpu",
                    "--decoder", "torch", "--batch-size", "4")
    assert result.exit_code == 1 and "1272 wide, not 1280" in result.output, result.output
    assert not list(tmp_path.glob("f.h5.parts/rows-*.npz")) and not (tmp_path / "f.h5").exists()
