"""PruneConfig.gram_precision: what the statistics' Gram updates multiply (fp32, TF32 products, bf16
inputs), always summed in fp32; on the CPU the faster settings are emulated by rounding the inputs."""

from __future__ import annotations

import hashlib
import math
import os

import pytest
import torch

from fasp_ext import pipeline
from fasp_ext.calibration import Stats, round_tf32
from tiny_models import random_tokens, tiny_family


def _tf32_reference(x: torch.Tensor) -> torch.Tensor:
    """x rounded to 11 significant bits (TF32's 10 stored mantissa bits), to nearest even."""
    m, e = torch.frexp(x.double())
    return (torch.round(m * 2 ** 11) / 2 ** 11 * torch.pow(2.0, e.double())).float()


def _tf32_exact(v: float) -> float:
    """One fp32 value rounded to TF32, from its real value (Python floats hold fp32 values exactly):
    the quantum is 2^(E - 11) for v = f 2^E, 0.5 <= |f| < 1 (11 significant bits), never below
    2^-136 (TF32's subnormal spacing, fp32's exponent range), ties to even (Python's round);
    2^128 and beyond are infinite."""
    if v != v or v in (float("inf"), -float("inf")) or v == 0.0:
        return v
    _, E = math.frexp(v)
    q = 2.0 ** max(E - 11, -136)
    r = math.copysign(round(abs(v) / q) * q, v)  # exact (q a power of two); round: ties to even
    return math.copysign(float("inf"), v) if abs(r) >= 2.0 ** 128 else r


def test_round_tf32_against_exact_rounding_on_every_kind_of_bit_pattern():
    """round_tf32 (bit arithmetic) against the rounding of each value's exact real value: random bit
    patterns over the whole fp32 range (subnormals, NaN patterns included) and the edge cases by
    name: ties both ways and both signs, the last TF32 value and what rounds past it to inf."""
    g = torch.Generator().manual_seed(4)
    bits = torch.randint(-2 ** 31, 2 ** 31, (20000,), generator=g, dtype=torch.int64)
    low = torch.randint(0, 2 ** 14, (2000,), generator=g, dtype=torch.int64)  # subnormals, both signs
    named = [0x3F800000 + 0x1000, 0x3F800000 + 0x3000, 0x3F800000 + 0x1001, 0x3F800000 + 0x0FFF,  # ties, 1 +- ulp
             0xBF801000, 0xBF803000,  # negative ties
             0x7F7FE000, 0x7F7FEFFF, 0x7F7FF000, 0x7F7FFFFF, 0xFF7FFFFF,  # last TF32 value; to inf
             0x00000001, 0x00001000, 0x00003000, 0x00002000, 0x007FFFFF, 0x80001000,  # subnormals
             0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x00000000, 0x80000000]
    pattern = torch.cat([bits, low, low | (1 << 31), torch.tensor(named, dtype=torch.int64)])
    x = ((pattern + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32).view(torch.float32)
    got = round_tf32(x)
    want = torch.tensor([_tf32_exact(v) for v in x.tolist()], dtype=torch.float64).float()
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bitwise, -0.0 too
    by_name = dict(zip(named, round_tf32(x[-len(named):]).view(torch.int32).tolist()))
    assert by_name[0x3F801000] == 0x3F800000 and by_name[0x3F803000] == 0x3F804000  # ties to even
    assert by_name[0xBF801000] == 0xBF800000 - 2 ** 32 and by_name[0x3F801001] == 0x3F802000
    assert by_name[0x7F7FEFFF] == 0x7F7FE000 and by_name[0x7F7FF000] == 0x7F800000  # overflow to inf
    assert by_name[0x00001000] == 0 and by_name[0x00003000] == 0x4000


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_stats_round_the_gram_inputs_and_sum_in_fp32(precision):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 24, generator=g) * 3.0
    st = Stats.new(24, "cpu", gram=True, precision=precision)
    st.add(x)
    st.reduce()
    X = x.reshape(-1, 24).double()
    if precision == "bf16":  # s and H both from the bf16-rounded inputs, as the GPU's bf16 Gram
        Xr = x.reshape(-1, 24).to(torch.bfloat16).double()
        Xs = Xr
    elif precision == "tf32":  # H from TF32-rounded inputs, s from the inputs themselves
        Xr = _tf32_reference(x.reshape(-1, 24)).double()
        Xs = X
    else:
        Xr = Xs = X
    torch.testing.assert_close(st.H.double(), Xr.t() @ Xr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(st.s.double(), (Xs * Xs).sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(st.mu.double(), X.sum(0), rtol=1e-5, atol=1e-4)  # means never rounded
    if precision != "fp32":  # the rounding is visible: the test would notice it missing
        assert (st.H.double() - X.t() @ X).abs().max() > 1e-3


def test_held_out_runs_use_the_precision_too():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, 6, generator=g)
    st = Stats.new(6, "cpu", gram=True, val_every=2, precision="bf16")
    st.add(x)
    st.reduce()
    Xr = x.to(torch.bfloat16).double()
    val = Xr[1::2].reshape(-1, 6)
    torch.testing.assert_close(st.H_val.double(), val.t() @ val, rtol=1e-5, atol=1e-4)
    allr = Xr.reshape(-1, 6)
    torch.testing.assert_close(st.H.double(), allr.t() @ allr, rtol=1e-5, atol=1e-4)


def _prune_hash(**kw) -> tuple[str, torch.nn.Module]:
    model = tiny_family("llama")
    pipeline.prune(model, random_tokens(6, 16), pipeline.PruneConfig(sparsity=0.3, progress=False, **kw))
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), model


def test_cpu_default_is_fp32_and_the_others_differ_slightly():
    assert pipeline.PruneConfig().gram_precision_on("cpu") == "fp32"
    default, m0 = _prune_hash()
    fp32, _ = _prune_hash(gram_precision="fp32")
    assert default == fp32
    bf16, m1 = _prune_hash(gram_precision="bf16")
    assert bf16 != default
    w0, w1 = m0.model.layers[0].mlp.down_proj.weight, m1.model.layers[0].mlp.down_proj.weight
    if w0.shape == w1.shape:
        assert (w0 - w1).norm() < 0.05 * w0.norm()


def test_defaults_are_the_documented_ones():
    """fp32 on a CPU, TF32 on a GPU (the screen's decision), as docs/gpu.md states it."""
    assert pipeline.GRAM_PRECISION_DEFAULT == {"cpu": "fp32", "cuda": "tf32"}
    assert pipeline.PruneConfig().gram_precision_on("cuda:0") == "tf32"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    doc = open(os.path.join(root, "docs", "gpu.md")).read()
    assert 'GRAM_PRECISION_DEFAULT = {"cpu": "fp32", "cuda": "tf32"}' in doc


def test_gpu_default_comes_from_the_table(monkeypatch):
    monkeypatch.setitem(pipeline.GRAM_PRECISION_DEFAULT, "cuda", "bf16")
    assert pipeline.PruneConfig().gram_precision_on("cuda") == "bf16"
    assert pipeline.PruneConfig().gram_precision_on("cpu") == "fp32"
    assert pipeline.PruneConfig(gram_precision="tf32").gram_precision_on("cuda:0") == "tf32"


def test_bad_precision_names_the_argument():
    with pytest.raises(ValueError, match="gram_precision must be one of fp32, tf32, bf16, got 'fp16'"):
        pipeline.PruneConfig(gram_precision="fp16").validate()


def test_cli_takes_the_setting(capsys):
    from fasp_ext.cli import _config_from, build_parser

    ap = build_parser()
    args = ap.parse_args(["prune", "--model", "x", "--out", "y", "--calib", "c", "--gram-precision", "bf16"])
    assert _config_from(args).gram_precision == "bf16"
    args = ap.parse_args(["prune", "--model", "x", "--out", "y", "--calib", "c"])
    assert _config_from(args).gram_precision is None
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["prune", "--model", "x", "--out", "y", "--calib", "c", "--gram-precision", "fp16"])
    assert e.value.code == 2
    assert "--gram-precision" in capsys.readouterr().err
