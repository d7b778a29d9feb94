"""The host-sync budget of a prune, counted on the CPU (tests/sync_budget.py), and the CUDA sources'
declared host waits.

With ``ops.defers`` on, a CPU run takes the code path a GPU run takes (checks and counters kept on
the device, phase timers from events), and ``SyncCounter`` counts what would make the host wait.
The budget: nothing per calibration batch (the same count from 2 windows as from the same windows
repeated 4 times, so every decision is the same), and a small constant per block.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from fasp_ext import ops, pipeline
from fasp_ext.calibration import Stats, round_tf32
from sync_budget import FakeEvent, SyncCounter
from tiny_models import random_tokens, tiny_family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: host waits fasp_ext may make per block (every pass, every structure, with the allocation's)
PER_BLOCK = 20


def _fake_event(device):
    ev = FakeEvent(enable_timing=True)
    ev.record()
    return ev


@pytest.fixture
def gpu_path(monkeypatch):
    """The pipeline's GPU code path on the CPU: deferred checks, phase timers from (fake) events."""
    monkeypatch.setattr(ops, "defers", lambda device: True)
    monkeypatch.setattr(pipeline, "_cuda_event", _fake_event)


def _count(family: str, windows: int, **cfg) -> SyncCounter:
    model = tiny_family(family)
    tokens = random_tokens(2, 16).repeat(windows // 2, 1)
    with SyncCounter() as c:
        pipeline.prune(model, tokens, pipeline.PruneConfig(sparsity=0.3, batch_size=1, progress=False, **cfg))
    return c


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3: tokens weighed (device-side counts)
@pytest.mark.parametrize("one_pass", [False, True])
def test_no_host_wait_per_batch(gpu_path, family, one_pass):
    _count(family, 2, one_pass=one_pass)  # first calls in a process check things once (attention replay)
    few, many = _count(family, 2, one_pass=one_pass), _count(family, 8, one_pass=one_pass)
    assert many.owned() == few.owned(), f"host waits grow with the batches:\n2 windows:\n{few.report()}\n" \
                                    f"8 windows:\n{many.report()}"
    blocks = len(tiny_family(family).model.layers)
    assert few.total() <= PER_BLOCK * blocks, few.report()
    # the phase timers wait once, at the end; nothing calls torch.cuda.synchronize
    assert few.by_kind().get("synchronize", 0) == 1, few.report()


def test_phase_times_from_events(gpu_path):
    """The event timer reports every phase the wall-clock timer does, in seconds."""
    model = tiny_family("llama")
    with SyncCounter() as c:
        rep = pipeline.prune(model, random_tokens(4, 16), pipeline.PruneConfig(sparsity=0.3, progress=False))
    for phase in ("capture", "forward_attention_stats", "solve_attention", "forward_mlp_stats", "solve_mlp",
                  "allocation_forward", "allocation_costs"):
        assert phase in rep.times and 0 <= rep.times[phase] < rep.times["total"], (phase, rep.times)
    assert c.by_kind().get("synchronize") == 1


def test_timer_settles_once():
    """_Timer on a (mocked) CUDA device: one synchronisation for all phases, sums per phase."""
    events = []

    class Ev(FakeEvent):
        def __init__(self, t):
            super().__init__()
            self.t, self.waits = t, 0
            events.append(self)

        def synchronize(self):
            self.waits += 1

    clock = iter(range(100))
    timer = pipeline._Timer(torch.device("cpu"))
    timer.events = True
    orig = pipeline._cuda_event
    pipeline._cuda_event = lambda device: Ev(float(next(clock)))
    try:
        for name in ("a", "b", "a"):
            with timer(name):
                pass
        times = timer.settle()
    finally:
        pipeline._cuda_event = orig
    assert times == {"a": 2.0, "b": 1.0}  # each phase one second on the fake clock
    assert sum(e.waits for e in events) == 1 and events[-1].waits == 1


@pytest.mark.parametrize("one_pass", [False, True])
def test_nan_batch_stops_before_anything_changes(monkeypatch, one_pass):
    """A calibration batch with NaN stops the run with the op's message, on the CPU path (checked
    per batch) and on the GPU path (flag kept on the device, read where the statistics are used),
    and the model is left exactly as it was."""
    for deferred in (False, True):
        monkeypatch.setattr(ops, "defers", lambda device, d=deferred: d)
        monkeypatch.setattr(pipeline, "_cuda_event", _fake_event)
        model = tiny_family("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        block = model.model.layers[0]

        def poison(_mod, args):
            x = args[0].clone()
            x[-1, -1, 0] = float("nan")  # the last window of the batch
            return (x,)

        block.self_attn.o_proj.register_forward_pre_hook(poison)
        with pytest.raises(ValueError, match=re.escape(ops.NONFINITE_X)):
            pipeline.prune(model, random_tokens(4, 16), pipeline.PruneConfig(sparsity=0.3, progress=False,
                                                                             one_pass=one_pass))
        after = model.state_dict()
        assert after.keys() == before.keys()
        for k in before:
            assert after[k].shape == before[k].shape and torch.equal(after[k], before[k]), k


def test_deferred_accumulate_matches_reference():
    """ops.accumulate_stats with ``bad``: the reference's sums, NaN/Inf set the flag instead of raising."""
    from fasp_ext import reference as ref

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 5, 7, generator=g)
    s, H = torch.zeros(7), torch.zeros(7, 7)
    s_ref, H_ref = torch.zeros(7), torch.zeros(7, 7)
    bad = torch.zeros(1, dtype=torch.int32)
    ops.accumulate_stats(X, s, H, bad=bad)
    ref.accumulate_stats(X, s_ref, H_ref)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(H, H_ref)
    assert int(bad) == 0
    X[1, 2, 3] = float("inf")
    ops.accumulate_stats(X, s, H, bad=bad)  # no raise
    assert int(bad) != 0
    ops.accumulate_stats(torch.randn(2, 7), torch.zeros(7), None, bad=bad)
    assert int(bad) != 0  # stays set
    with pytest.raises(ValueError, match="bad must be an int32 tensor of one element"):
        ops.accumulate_stats(X, s, H, bad=torch.zeros(1))
    with pytest.raises(ValueError, match=re.escape(ops.NONFINITE_X)):
        ops.raise_if_bad(bad)


def test_stats_settle_one_read(gpu_path):
    """Stats.reduce on the GPU path: weighted counts and the flag come back together, the counts
    equal the CPU path's exactly."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 6, 5, generator=g) for _ in range(3)]
    ws = [torch.rand(2, 6, generator=g) + 0.5 for _ in range(3)]
    got = {}
    for deferred in (False, True):
        ops.defers = lambda device, d=deferred: d
        st = Stats.new(5, "cpu", gram=True, val_every=2)
        for x, w in zip(xs, ws):
            st.add(x, weight=w)
        with SyncCounter() as c:
            st.reduce()
        got[deferred] = (st.n, st.n_val, st.H.clone(), c.total())
    assert got[True][0] == got[False][0] and got[True][1] == got[False][1]
    torch.testing.assert_close(got[True][2], got[False][2], rtol=1e-5, atol=1e-5)
    assert got[True][3] == 1  # one read for the flag and both counts


def test_stream_energy_as_before():
    """The stream energy summed on the device equals the per-batch Python sum it replaced, bitwise."""
    from fasp_ext.allocation import stream_energy

    g = torch.Generator().manual_seed(2)
    hidden = [torch.randn(2, 9, 16, generator=g) * (i + 1) for i in range(5)]
    old = sum(float(torch.linalg.vector_norm(x, dtype=torch.float32)) ** 2 for x in hidden)
    with SyncCounter() as c:
        new = stream_energy(hidden, "cpu")
    assert new == old
    assert c.total() == 1


def test_round_tf32_matches_frexp_rounding():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(10000, generator=g) * 10.0 ** torch.randint(-30, 30, (10000,), generator=g),
                   torch.tensor([0.0, -0.0, 1.0, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, float("inf"), -float("inf")])])
    m, e = torch.frexp(x.double())
    want = (torch.round(m * 2 ** 11) / 2 ** 11 * torch.pow(2.0, e.double())).float()  # 11 significant bits
    want = torch.where(torch.isfinite(x), want, x)
    got = round_tf32(x)
    assert torch.equal(got, want)
    assert torch.isnan(round_tf32(torch.tensor([float("nan")]))).all()


# ----------------------------------------------------------------------------- the CUDA sources
#: what makes the host wait in C++/CUDA: reads of device values, copies to the host, synchronisation,
#: ATen calls that check their result on the host or size their output from the data
_WAITS = re.compile(r"\.item\s*[<(]|\.cpu\s*\(|\.to\s*\(\s*(at|c10|torch)::(kCPU|Device\s*\(\s*(at|c10)::kCPU)|"
                    r"\bcudaDeviceSynchronize\b|\bcudaStreamSynchronize\b|\bcudaEventSynchronize\b|"
                    r"\bcudaMemcpy(2D|3D|ToSymbol|FromSymbol)?\s*\(|\.synchronize\s*\(|\bdevice_synchronize\b|"
                    r"\.tolist\s*\(|_local_scalar_dense|\bat::nonzero\s*\(|\.nonzero\s*\(|masked_select|"
                    r"\bat::unique|\.equal\s*\(|\ballclose\b|\bis_nonzero\b|\bat::linalg_(eigh|cholesky|inv|solve)\s*\(|"
                    r"\bat::cholesky\s*\(|\bat::linalg_cholesky\s*\(|\bstream\.synchronize")
_MARK = re.compile(r"//\s*HOST_SYNC:\s*([\w.]+)")


def _table() -> dict[str, tuple[str, int]]:
    """kHostSyncs of csrc/cuda/common.cuh: name -> (op, waits per call)."""
    src = open(os.path.join(ROOT, "csrc", "cuda", "common.cuh")).read()
    body = src[src.index("kHostSyncs[] = {"):]
    body = body[:body.index("};")]
    rows = re.findall(r'\{\s*"([\w.]+)"\s*,\s*"(\w+)"\s*,\s*(\d+)\s*,', body)
    assert rows, "kHostSyncs table not found in csrc/cuda/common.cuh"
    return {name: (op, int(n)) for name, op, n in rows}


def undeclared_waits(text: str, names) -> list[str]:
    """Lines of C++ source ``text`` that make the host wait without a declared ``// HOST_SYNC: name``
    (comment lines aside), and markers naming an entry the table lacks."""
    bad = []
    for i, line in enumerate(text.splitlines(), 1):
        code = line.split("//", 1)[0]
        mark = _MARK.search(line)
        if mark and mark.group(1) not in names:
            bad.append(f"{i}: HOST_SYNC {mark.group(1)!r} is not in kHostSyncs: {line.strip()}")
        if _WAITS.search(code) and not mark:
            bad.append(f"{i}: undeclared host wait: {line.strip()}")
    return bad


def _cuda_sources():
    d = os.path.join(ROOT, "csrc", "cuda")
    return {f: open(os.path.join(d, f)).read() for f in sorted(os.listdir(d)) if f.endswith((".cu", ".cuh", ".cpp"))}


def test_cuda_sources_declare_every_host_wait():
    table = _table()
    found = []
    for name, text in _cuda_sources().items():
        found += [f"{name}:{b}" for b in undeclared_waits(text, table)]
    assert not found, "\n".join(found)


def test_scanner_catches_waits():
    """The source check is not vacuous: each kind of wait is found, and a declared one passes."""
    for line in ("int v = flag.item<int>();", "auto c = t.cpu();", "cudaDeviceSynchronize();",
                 "cudaStreamSynchronize(stream);", "cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost);",
                 "auto n = at::nonzero(mask);", "auto e = at::linalg_eigh(A);", "x.to(at::kCPU);",
                 "double d = t.item().toDouble();"):
        assert undeclared_waits(line, {"x.y"}), line
        assert not undeclared_waits(line + "  // HOST_SYNC: x.y", {"x.y"}), line
        assert undeclared_waits(line + "  // HOST_SYNC: x.z", {"x.y"}), line
    for line in ("cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream);", "auto n = at::nonzero_static(m, 3);",
                 "// a comment mentioning .item() and cudaDeviceSynchronize", "at::linalg_cholesky_ex(A);"):
        assert not undeclared_waits(line, set()), line


def test_table_matches_ops_host_syncs():
    """Per op, the waits the CUDA sources declare per call equal ops.HOST_SYNCS (which the budget
    test counts), and every declared name is used in the sources."""
    table = _table()
    marks = set()
    for text in _cuda_sources().values():
        marks |= set(_MARK.findall(text))
    assert marks == set(table), (marks, set(table))
    per_op: dict[str, int] = {}
    for op, n in table.values():
        per_op[op] = per_op.get(op, 0) + n
    for op, n in per_op.items():
        assert ops.HOST_SYNCS[f"fasp_ext::{op}"] == n, op
    assert ops.HOST_SYNCS["fasp_ext::accumulate_stats_deferred"] == 0


# ----------------------------------------------------------------------------- placement (item 3)
GB = 1 << 30


def test_plan_placement_cpu_keeps_its_budget():
    assert pipeline.plan_placement([GB] * 4, GB, GB, None) == pipeline.Placement(False, False, 2 << 30)
    assert pipeline.plan_placement([GB], 0, 0, None, store_budget_bytes=123).store_budget_bytes == 123


def test_plan_placement_resident_when_it_fits():
    # 30 blocks of 0.5 GiB + 1 GiB of embeddings + 4 GiB of work on 80 GiB: resident; budget from the rest
    p = pipeline.plan_placement([GB // 2] * 30, GB, 4 * GB, 80 * GB)
    assert p.resident and not p.prefetch
    assert p.store_budget_bytes == (int(80 * GB * 0.9) - 16 * GB - 4 * GB) // 3
    # the same model on 20 GiB does not fit (16 + 4 > 18): prefetched, two blocks on the device
    p = pipeline.plan_placement([GB // 2] * 30, GB, 4 * GB, 20 * GB)
    assert p.prefetch and not p.resident
    assert p.store_budget_bytes == (int(20 * GB * 0.9) - GB - GB - 4 * GB) // 3
    # exactly at the edge fits
    assert pipeline.plan_placement([10], 0, 8, 20).resident
    assert not pipeline.plan_placement([11], 0, 8, 20).resident


def test_plan_placement_model_already_there_or_lazy():
    """moves=False (the model already on the device, or loaded lazily): nothing is placed, the budget
    still comes from the free memory, none of it held for the model (it is out of the free memory)."""
    p = pipeline.plan_placement([GB] * 4, GB, 2 * GB, 10 * GB, moves=False)
    assert not p.resident and not p.prefetch
    assert p.store_budget_bytes == (int(10 * GB * 0.9) - 2 * GB) // 3
    # an explicit budget is kept; nothing left is a budget of 0, never negative
    assert pipeline.plan_placement([GB], 0, 0, GB, store_budget_bytes=7, moves=False).store_budget_bytes == 7
    assert pipeline.plan_placement([GB], 0, 50 * GB, GB, moves=False).store_budget_bytes == 0


def test_capture_leaves_the_output_head_where_it_is():
    """_move (capture, ResidentMover) moves everything but the output head; a head tied to the
    embeddings moves with them. (A dtype stands in for a device: Tensor.to takes either.)"""
    from fasp_ext.calibration import ResidentMover, _move, output_head

    model = tiny_family("llama")  # untied head
    head = output_head(model)
    assert head is model.lm_head
    _move(model, torch.float64, skip=head)
    assert model.lm_head.weight.dtype == torch.float32
    assert all(p.dtype == torch.float64 for n, p in model.named_parameters() if not n.startswith("lm_head"))
    assert "_apply" not in model.lm_head.__dict__  # the stand-in is gone
    tied = tiny_family("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    mover = ResidentMover(torch.float32, torch.float64)
    mover.load(tied)
    assert tied.lm_head.weight.dtype == torch.float64 and tied.lm_head.weight is tied.model.embed_tokens.weight
    blocks = tied.model.layers
    assert mover.fetch(blocks, 1, None) is blocks[1]
    mover.release(blocks, 1, blocks[1], final=True)
    assert blocks[1].mlp.down_proj.weight.dtype == torch.float64  # stays until unload
    mover.unload(tied)
    assert all(p.dtype == torch.float32 for p in tied.parameters())


def test_capture_copies_the_tokens_once(monkeypatch):
    """The calibration tokens go to the device in one copy, not one per batch."""
    from fasp_ext import calibration

    calls = []
    orig = torch.Tensor.to
    tokens = random_tokens(6, 16)

    def to(self, *a, **k):
        if self is tokens or self._base is tokens:
            calls.append(tuple(self.shape))
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    model = tiny_family("llama")
    calibration.capture_block_inputs(model, model.model.layers, tokens, 2, torch.device("cpu"))
    assert calls == [(6, 16)]
