"""GPU tests (marked gpu; conftest skips them without CUDA): the GPU paths against the tested CPU ones.

GPU tolerances, not CPU ones: featurize on CUDA computes in float16 autocast,
so it is judged by featurize --verify's tolerance for that precision; the
trainer's CUDA runs are compared with the CPU's at rtol 1e-3. None of these
has run yet: no GPU was available to this project (README, "GPU path: what is
verified").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.featurize import main as featurize_main  # noqa: E402
from pipeline.features.read import read_settings  # noqa: E402
from pipeline.heads.config import HeadConfig
from pipeline.heads.stack_ops import adam_step
from pipeline.heads.training import train_heads  # noqa: E402
from pipeline.images.dali_decoder import dali_available  # noqa: E402
from tests.heads.test_heads import TINY, flat_params, synthetic_data  # noqa: E402

pytestmark = pytest.mark.gpu

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "utkface"


@pytest.mark.parametrize("decoder", ["torch", "dali"])
def test_featurize_on_the_gpu_passes_verify_against_the_cpu_reference(decoder, tmp_path, calibrated_mobilenet):
    if decoder == "dali" and not dali_available():
        pytest.skip("DALI is not installed")
    out, report = tmp_path / f"{decoder}.h5", tmp_path / "verify.json"
    made = CliRunner().invoke(featurize_main, [
        str(SAMPLE), "-o", str(out), "--device", "cuda", "--decoder", decoder, "--backbones", "mobilenet_v2",
        "--weights", str(calibrated_mobilenet), "--limit", "48", "--batch-size", "16", "--quiet", "--verify", "24"])
    assert made.exit_code == 0, made.output
    compute = read_settings(out)["compute"]
    assert compute["device"] == "cuda" and compute["precision"] == "float16-autocast"
    assert compute["decoder"] == f"{decoder}-gpu"
    assert "verify: passed" in made.output
    checked = CliRunner().invoke(featurize_main, ["verify", str(out), "--data", str(SAMPLE), "-n", "48",
                                                  "--weights", f"mobilenet_v2={calibrated_mobilenet}",
                                                  "--json", str(report)])
    assert checked.exit_code == 0, checked.output
    result = json.loads(report.read_text())
    (decoded,) = result["decoded"]
    assert decoded["decoder"] == f"{decoder}-gpu" and decoded["max_abs"] is not None  # really decoded on the GPU
    assert all(o["min_cosine"] >= 0.999 for o in result["outputs"])


def test_featurize_gpu_float32_is_real_float32(tmp_path, calibrated_mobilenet):
    """--precision float32 on CUDA switches TF32 off: features within float rounding of the CPU's."""
    out = tmp_path / "f32.h5"
    made = CliRunner().invoke(featurize_main, [
        str(SAMPLE), "-o", str(out), "--device", "cuda", "--decoder", "torch", "--precision", "float32", "--dtype",
        "float32", "--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet), "--limit", "16", "--quiet",
        "--verify", "16"])
    assert made.exit_code == 0, made.output
    assert read_settings(out)["compute"]["precision"] == "float32" and "verify: passed" in made.output


def test_fused_adamw_on_cuda_matches_torch_optim():
    torch.manual_seed(0)
    params = [torch.randn(64, 32, device="cuda"), torch.randn(32, device="cuda")]
    grads = [torch.randn_like(p) for p in params]
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = torch.optim.AdamW(reference, lr=1e-3, weight_decay=1e-2, foreach=False, fused=False)
    exp_avg, exp_avg_sq = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    step = torch.zeros((), device="cuda")
    for _ in range(3):
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        optimizer.step()
        step += 1
        adam_step(params, grads, exp_avg, exp_avg_sq, step, lr=1e-3, weight_decay=1e-2)
    for ours, theirs in zip(params, reference):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_training_recipe_on_cuda_matches_cpu_without_dropout():
    """Weight decay (fused AdamW), the cosine schedule, label smoothing: CUDA within GPU rounding of the CPU."""
    data = synthetic_data(n=160, d=16)
    cfg = HeadConfig(epochs=3, hidden=TINY, dropout=0.0, weight_decay=1e-2, schedule="cosine", label_smoothing=0.1)
    cpu = train_heads(data, [cfg])[0]
    gpu = train_heads(data.to("cuda"), [cfg])[0]
    for a, b in zip(flat_params(cpu), flat_params(gpu)):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-3, atol=1e-4)


def test_dropout_on_cuda_is_seeded_applied_and_still_learns():
    data = synthetic_data(n=320, d=16, signal=2.0)
    cuda = data.to("cuda")
    recipe = dict(epochs=20, lr=1e-2, hidden=TINY, weight_decay=1e-4, schedule="cosine", seed=3)
    first = train_heads(cuda, [HeadConfig(dropout=0.5, **recipe)])[0]
    again = train_heads(cuda, [HeadConfig(dropout=0.5, **recipe)])[0]
    without = train_heads(cuda, [HeadConfig(dropout=0.0, **recipe)])[0]
    cpu = train_heads(data, [HeadConfig(dropout=0.5, **recipe)])[0]
    for a, b in zip(flat_params(first), flat_params(again)):  # same seed on the same device: the same head
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(flat_params(first), flat_params(without)))
    # Other dropout masks than the CPU's (another generator), the same quality of head.
    val = [max(h["val_acc"] for h in r.history) for r in (first, cpu)]
    assert val[0] > 0.8 and abs(val[0] - val[1]) < 0.1, val  # on the CPU (same recipe): 0.99

