"""One meaning per option: -c/--checkpoint, -f/--feature-file, --feature-kind, -o as a file or a folder.

The old spellings (--features for a file or a kind, evaluate's positional checkpoints) still work,
hidden from --help.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.evaluate import main as evaluate_main
from pipeline.cli.exit_codes import OK, USAGE
from pipeline.cli.explain import main as explain_main
from pipeline.cli.featurize import main as featurize_main
from pipeline.cli.options import rewrite_aliases
from pipeline.cli.train_head import main as train_head_main
from pipeline.heads.checkpoint import load_checkpoint
from tests.support.cli import QUICK, invoke, quick_head
from tests.support.synthetic import make_feature_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = {"mobilenet_v2": (32, 16)}
NAMES = {featurize_main: "featurize", train_head_main: "train-head", evaluate_main: "evaluate",
         explain_main: "explain"}


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory) -> Path:
    return make_feature_file(tmp_path_factory.mktemp("names") / "features.h5", n=200, widths=WIDTHS)


@pytest.fixture(scope="module")
def head(feature_file, tmp_path_factory) -> Path:
    return quick_head(feature_file, tmp_path_factory.mktemp("head") / "mnv2")


def test_rewrite_aliases_renames_old_spellings_up_to_a_double_dash():
    aliases = {"--features": "--feature-file"}
    assert rewrite_aliases(["--features", "a.h5", "--features=b.h5", "-c", "x", "--", "--features"], aliases) == \
        ["--feature-file", "a.h5", "--feature-file=b.h5", "-c", "x", "--", "--features"]
    assert rewrite_aliases(["--features-more", "x"], aliases) == ["--features-more", "x"]


def test_train_head_feature_kind_and_its_old_spelling_train_the_same_head(feature_file, tmp_path):
    new = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", tmp_path / "new",
                 "--feature-kind", "both", *QUICK)
    old = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", tmp_path / "old",
                 "--features", "both", *QUICK)
    assert new.exit_code == old.exit_code == OK, new.output + old.output
    a, b = load_checkpoint(tmp_path / "new").meta, load_checkpoint(tmp_path / "old").meta
    assert a["feature_kind"] == b["feature_kind"] == "both" and a["feature_dim"] == b["feature_dim"] == 32 + 16
    assert a["history"] == b["history"]
    bad = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", tmp_path / "bad",
                 "--feature-kind", "everything", *QUICK)
    assert bad.exit_code == USAGE and "--feature-kind" in bad.output


def test_an_explicit_old_spelling_still_wins_over_the_recipe(feature_file, tmp_path):
    # --recipe best feeds both+stage_grid (a descriptor this file lacks); the command line's kind wins.
    result = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", tmp_path / "h",
                    "--recipe", "best", "--features", "last", *QUICK)
    assert result.exit_code == OK, result.output
    assert load_checkpoint(tmp_path / "h").meta["feature_kind"] == "last"


def test_evaluate_checkpoint_option_and_the_old_positional_form_score_the_same(feature_file, head, tmp_path):
    new = invoke(evaluate_main, "-c", head, "-f", feature_file, "-o", tmp_path / "new")
    long = invoke(evaluate_main, "--checkpoint", head, "--feature-file", feature_file, "-o", tmp_path / "long")
    old = invoke(evaluate_main, head, "--features", feature_file, "-o", tmp_path / "old")
    assert new.exit_code == long.exit_code == old.exit_code == OK, new.output + long.output + old.output
    scores = [json.loads((tmp_path / d / "metrics.json").read_text())["checkpoints"]["mnv2"]
              for d in ("new", "long", "old")]
    assert scores[0]["accuracy"] == scores[1]["accuracy"] == scores[2]["accuracy"]
    assert scores[0]["n"] == scores[2]["n"] > 0


def test_evaluate_without_a_checkpoint_is_a_usage_error(feature_file, tmp_path):
    result = invoke(evaluate_main, "-f", feature_file, "-o", tmp_path / "ev")
    assert result.exit_code == USAGE and "-c/--checkpoint" in result.output


@pytest.mark.parametrize("command", [evaluate_main, train_head_main, explain_main])
def test_help_shows_the_new_names_only(command):
    text = CliRunner().invoke(command, ["--help"], prog_name=NAMES[command]).output
    assert "--features" not in text
    assert "--feature-kind" in text if command is train_head_main else "--feature-file" in text
    if command is evaluate_main:
        assert "Usage: evaluate [OPTIONS]\n" in text and "-c, --checkpoint DIR" in text and "LEGACY" not in text


def test_explain_report_takes_the_feature_file_by_either_spelling(feature_file, head, tmp_path):
    # Without --data the report stops with its own usage line: the file option itself was understood.
    for spelling in ("-f", "--feature-file", "--features"):
        result = invoke(explain_main, "--report", spelling, feature_file, "-c", head, "-o", tmp_path / "r")
        assert result.exit_code == USAGE and "--report needs" in result.output, (spelling, result.output)
        assert "No such option" not in result.output


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "existing.txt"
    path.write_text("x")
    return path


def test_wrong_kind_of_output_is_refused_in_one_line(feature_file, head, tmp_path, a_file):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    cases = [
        (featurize_main, [tmp_path, "-o", folder], "is a folder; featurize writes a FILE"),
        (featurize_main, [tmp_path, "-o", f"{tmp_path}/new_folder/"], "is a folder; featurize writes a FILE"),
        (featurize_main, ["merge", feature_file, "-o", folder], "is a folder"),
        (featurize_main, ["join", feature_file, "-o", folder], "is a folder"),
        (train_head_main, [feature_file, "--backbones", "mobilenet_v2", "-o", a_file], "is a file; train-head writes a FOLDER"),
        (evaluate_main, ["-c", head, "-f", feature_file, "-o", a_file], "is a file; evaluate writes a FOLDER"),
        (explain_main, [a_file, "-c", head, "-o", a_file], "is a file; explain writes a FOLDER"),
    ]
    for command, args, message in cases:
        result = CliRunner().invoke(command, [str(a) for a in args], prog_name=NAMES[command])
        assert result.exit_code == USAGE, (args, result.output)
        error = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and message in error[0] and "-o/--out" in error[0], (args, result.output)
    assert a_file.read_text() == "x" and list(folder.iterdir()) == []


def test_outputs_of_the_right_kind_are_accepted(feature_file, head, tmp_path):
    existing = tmp_path / "eval"
    existing.mkdir()
    assert invoke(evaluate_main, "-c", head, "-f", feature_file, "-o", existing).exit_code == OK
    again = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", head.parent / "again", *QUICK)
    assert again.exit_code == OK
