"""Calibration activations on disk (fasp_ext/spill.py): a file-backed list of batches that reads back
exactly what was written, and prunes that are bitwise those of activations in memory."""

from __future__ import annotations

import gc
import json

import pytest
import torch

from fasp_ext import spill
from fasp_ext.cli import main
from fasp_ext.io import load_pruned, save_pruned
from fasp_ext.lazy import prune_checkpoint
from fasp_ext.pipeline import PruneConfig, prune
from tiny_models import FAMILIES, random_tokens, tiny_family


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_disk_batches_read_back_what_was_written(tmp_path, dtype):
    folder = spill.SpillFolder(tmp_path)
    b = folder.batches()
    g = torch.Generator().manual_seed(0)
    want = [(torch.randn(*s, generator=g) * 3).to(dtype) for s in [(2, 5, 8), (1, 5, 8), (0, 5, 8), (3, 1, 8)]]
    want.append(want[0][:, ::2])  # a non-contiguous view is stored as its values
    for t in want:
        b.append(t)
    assert len(b) == len(want)
    assert [spill.batch_shape(b, i) for i in range(len(b))] == [t.shape for t in want]
    for i, t in enumerate(want):
        got = b[i]
        assert got.dtype == dtype and got.shape == t.shape and torch.equal(got, t)
    assert all(torch.equal(x, t) for x, t in zip(b, want, strict=True))
    assert torch.equal(b[-1], want[-1])
    with pytest.raises(IndexError):
        b[len(want)]
    assert b.nbytes == folder.written == sum(t.numel() * t.element_size() for t in want)
    folder.close()
    assert not folder.path.exists()


def test_a_read_batch_is_a_copy_and_files_go_when_unused(tmp_path):
    folder = spill.SpillFolder(tmp_path)
    a = folder.batches()
    a.append(torch.ones(2, 3))
    x = a[0]
    x.add_(1)  # changing what was read does not change the list
    assert torch.equal(a[0], torch.ones(2, 3))
    files = lambda: sorted(p.name for p in folder.path.iterdir())  # noqa: E731
    assert len(files()) == 1
    b = spill.copy_of(a)
    assert len(files()) == 2 and torch.equal(b[0], a[0])
    c = a.empty()
    c.append(torch.zeros(4))
    a[:] = c  # a takes over c's file; a's own file is no longer used by any list
    gc.collect()
    assert len(files()) == 2
    assert torch.equal(a[0], torch.zeros(4)) and torch.equal(b[0], torch.ones(2, 3))
    del a, c
    gc.collect()
    assert len(files()) == 1  # b's
    m = folder.batches()
    m[:] = [torch.full((2,), 7.0), torch.full((1,), 8.0)]  # from an in-memory list: written to a new file
    assert [t.tolist() for t in m] == [[7.0, 7.0], [8.0]]
    with pytest.raises(TypeError):
        m[0] = torch.zeros(1)
    folder.close()


def test_helpers_take_both_kinds(tmp_path):
    mem = [torch.randn(2, 3, 4)]
    assert spill.empty_like(mem) == [] and spill.batch_shape(mem) == (2, 3, 4)
    assert spill.batches_device(mem) == torch.device("cpu")
    cp = spill.copy_of(mem)
    assert cp[0] is not mem[0] and torch.equal(cp[0], mem[0])
    folder = spill.SpillFolder(tmp_path)
    d = folder.batches()
    assert isinstance(spill.empty_like(d), spill.DiskBatches)
    folder.close()


def _states_equal(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


CONFIGS = {
    "default": dict(),
    "uniform": dict(allocation="uniform"),
    "replan": dict(allocation_replan=True),
    "one-pass": dict(one_pass=True),
    "dense-target": dict(target="dense"),
    "damp-auto": dict(damp="auto"),
    "no-store": dict(store_budget_bytes=0),  # neither the replay nor the correction: every pass recomputed
    "attn-head": dict(attn_unit="head"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_disk_activations_prune_bitwise_as_memory(tmp_path, name):
    toks = random_tokens(5, 24)  # 5 windows in batches of 2: a short last batch
    res = {}
    for where in ("memory", "disk"):
        m = tiny_family("llama")
        cfg = PruneConfig(sparsity=0.3, progress=False, batch_size=2, activations=where,
                          activations_dir=str(tmp_path / "act"), **CONFIGS[name])
        rep = prune(m, toks, cfg)
        res[where] = (m, rep)
        assert rep.activations == where
    _states_equal(res["memory"][0], res["disk"][0])
    assert res["disk"][1].activations_written_bytes > 0
    assert list((tmp_path / "act").iterdir()) == []  # the run's folder is gone


@pytest.mark.parametrize("family", FAMILIES)
def test_disk_activations_every_family(tmp_path, family):
    toks = random_tokens(4, 24)
    ms = []
    for where in ("memory", "disk"):
        m = tiny_family(family)
        prune(m, toks, PruneConfig(sparsity=0.25, progress=False, batch_size=3, activations=where,
                                   activations_dir=str(tmp_path)))
        ms.append(m)
    _states_equal(*ms)


def test_block_by_block_spills_by_default_next_to_the_output(tmp_path, monkeypatch):
    tiny_family("llama").save_pretrained(tmp_path / "src")
    toks = random_tokens(4, 24)
    seen = []
    real = spill.SpillFolder.__init__

    def spy(self, parent=None):
        real(self, parent)
        seen.append(self.path)

    monkeypatch.setattr(spill.SpillFolder, "__init__", spy)
    monkeypatch.setattr(spill, "AUTO_MIN_BYTES", 0)  # the tiny model's activations count as large
    rep = prune_checkpoint(tmp_path / "src", tmp_path / "out", toks, PruneConfig(sparsity=0.25, progress=False))
    assert rep["activations"] == "disk" and len(seen) == 1
    assert seen[0].parent.name.startswith(".out") and not seen[0].exists()  # in the output's temporary folder
    assert not any(p.name.startswith(".fasp-activations") for p in (tmp_path / "out").iterdir())
    m = tiny_family("llama")
    prune(m, toks, PruneConfig(sparsity=0.25, progress=False, activations="memory"))
    save_pruned(m, tmp_path / "mem")
    _states_equal(load_pruned(tmp_path / "out"), load_pruned(tmp_path / "mem"))
    # below the threshold, and in memory pruning, "auto" keeps them in memory
    monkeypatch.setattr(spill, "AUTO_MIN_BYTES", 1 << 40)
    rep = prune_checkpoint(tmp_path / "src", tmp_path / "out2", toks, PruneConfig(sparsity=0.25, progress=False))
    assert rep["activations"] == "memory"
    assert prune(tiny_family("llama"), toks, PruneConfig(sparsity=0.25, progress=False)).activations == "memory"


def test_folder_removed_when_the_run_fails(tmp_path):
    m = tiny_family("llama")
    toks = random_tokens(4, 24)
    blk = m.model.layers[1].mlp.down_proj
    blk.register_forward_pre_hook(lambda mod, args: (args[0] * float("nan"),))  # NaN reaches the statistics
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        prune(m, toks, PruneConfig(sparsity=0.25, progress=False, activations="disk", activations_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 20, 1 << 20, 1000))
    with pytest.raises(ValueError, match="activations_dir: .* GiB free"):
        prune(tiny_family("llama"), random_tokens(4, 24),
              PruneConfig(sparsity=0.25, progress=False, activations="disk", activations_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_config_and_cli_refuse_bad_values(tmp_path, capsys):
    with pytest.raises(ValueError, match="activations must be one of"):
        PruneConfig(activations="ssd").validate()
    tiny_family("llama").save_pretrained(tmp_path / "src")
    (tmp_path / "calib.txt").write_text("some words to calibrate on. " * 400)
    (tmp_path / "afile").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["prune", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--calib",
               str(tmp_path / "calib.txt"), "--activations-dir", str(tmp_path / "afile" / "sub"), "--quiet"])
    assert rc == 2
    assert "--activations-dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "afile").read_text() == "x"


def test_prune_checkpoint_on_disk_writes_the_same_result_and_says_so(tmp_path):
    tiny_family("llama").save_pretrained(tmp_path / "src")
    toks = random_tokens(4, 24)
    rep_disk = prune_checkpoint(tmp_path / "src", tmp_path / "d", toks,
                                PruneConfig(sparsity=0.25, progress=False, activations="disk"))
    rep_mem = prune_checkpoint(tmp_path / "src", tmp_path / "m", toks,
                               PruneConfig(sparsity=0.25, progress=False, activations="memory"))
    assert (rep_disk["activations"], rep_mem["activations"]) == ("disk", "memory")
    _states_equal(load_pruned(tmp_path / "d"), load_pruned(tmp_path / "m"))
    card = json.loads((tmp_path / "d" / "fasp_report.json").read_text())
    assert card["activations"] == "disk" and card["activations_written_bytes"] > 0


def test_auto_batch_size_bounds_the_tokens_of_a_cpu_forward():
    from fasp_ext.pipeline import CPU_BATCH_TOKENS, auto_batch_size

    assert [auto_batch_size("cpu", n) for n in (24, 512, 513, 1024, 2048, 4096, 8192)] == [8, 8, 7, 4, 2, 1, 1]
    assert all(auto_batch_size("cpu", n) * n <= max(CPU_BATCH_TOKENS, n) for n in range(1, 9000, 37))
    assert auto_batch_size("cuda", 2048) == 8 and auto_batch_size("meta", 4096) == 8
    toks = random_tokens(5, 40, seed=3)
    assert prune(tiny_family("llama"), toks, PruneConfig(sparsity=0.25, progress=False)).batch_size == 8
    assert prune(tiny_family("llama"), toks, PruneConfig(sparsity=0.25, progress=False, batch_size=3)).batch_size == 3
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PruneConfig(batch_size=0).validate()
