"""Every public op wrapper (fasp_ext.accumulate_stats / score_select / restore, the same functions as
fasp_ext.ops.*) traces under torch.compile(fullgraph=True), with the compiled library and with the
plain-torch fallback, and gives what the eager call gives. A graph break fails fullgraph."""

from __future__ import annotations

import pytest
import torch

import fasp_ext
from fasp_ext import _loader
from fasp_ext import ops as fops

COMPILED_CPU = "cpu" in _loader.compiled_devices()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def pipeline(X, W, s, H, groups):
    fasp_ext.accumulate_stats(X, s, H)
    kept_g = fasp_ext.score_select(W, s, 4, groups, 2)
    kept = fasp_ext.score_select(W, s, 20)
    out, rep = fasp_ext.restore(W, H, kept, 0.01)
    out64, rep64 = fops.restore(W, H.double(), kept, 0.1, True, 2)
    return out, out64, kept, kept_g, rep, rep64


@pytest.fixture(params=["compiled", "fallback"])
def mode(request, monkeypatch):
    if request.param == "compiled":
        if not COMPILED_CPU:
            pytest.skip(f"compiled library not built: {_loader.load_error()}")
    else:  # what runs when the library is absent: the reference, as fasp_ext_ref custom ops
        monkeypatch.setattr(fops, "compiled_ops_for", lambda device, op=None: None)
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_wrappers_compile_fullgraph(mode, backend):
    X = torch.randn(3, 40, 37, generator=gen(1))
    W = torch.randn(9, 37, generator=gen(2))
    groups = torch.arange(36).reshape(12, 3)
    s1, H1 = torch.zeros(37), torch.zeros(37, 37)
    s2, H2 = torch.zeros(37), torch.zeros(37, 37)
    want = pipeline(X, W, s1, H1, groups)
    got = torch.compile(pipeline, backend=backend, fullgraph=True)(X, W, s2, H2, groups)
    torch.testing.assert_close(s2, s1)  # the in-place updates happened, once
    torch.testing.assert_close(H2, H1)
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert isinstance(got[4], fasp_ext.RestoreReport)
    assert got[4] == want[4] and got[5] == want[5]
    assert got[4].path == "cholesky" and got[4].attempts == 1


def test_compiled_wrapper_still_checks_values(mode):
    W = torch.randn(4, 10, generator=gen(3))
    W[1, 2] = float("nan")
    f = torch.compile(lambda W, H, k: fasp_ext.restore(W, H, k, 0.01)[0], backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="W contains NaN or Inf"):
        f(W, torch.eye(10), torch.tensor([0, 2, 5]))
    with pytest.raises(Exception, match=r"kept indices must lie in \[0, 10\)"):
        f(torch.randn(4, 10), torch.eye(10), torch.tensor([0, 2, 12]))


def test_restore_report_reads_lazily():
    out, rep = fasp_ext.restore(torch.randn(3, 8), torch.eye(8), torch.tensor([1, 2]), 0.5)
    assert rep.tensor.dtype == torch.float64 and rep.tensor.shape == (3,)
    assert (rep.path, rep.lam, rep.attempts, rep.skipped) == ("cholesky", 0.5, 1, False)
    assert "cholesky" in repr(rep)
