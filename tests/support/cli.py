"""Running the click commands in tests: one way to invoke them, one quick head to test the others on."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from pipeline.cli.exit_codes import OK

# A couple of epochs of a small head on a synthetic file: a real, loadable checkpoint in about a second.
QUICK = ["--epochs", "2", "--hidden", "16,8", "--device", "cpu", "--threads", "1", "--quiet"]


def invoke(command, *args):
    """The command's result for these arguments, each passed as a string, as a shell would."""
    return CliRunner().invoke(command, [str(a) for a in args])


def quick_head(feature_file, out: Path, backbones: str = "mobilenet_v2") -> Path:
    """train-head's QUICK head on feature_file, saved in out (the run must succeed)."""
    from pipeline.cli.train_head import main as train_head_main

    result = invoke(train_head_main, feature_file, "--backbones", backbones, "-o", out, *QUICK)
    assert result.exit_code == OK, result.output
    return out
