"""Data-parallel calibration over torch.distributed (gloo, 2 processes under torchrun) equals one
process on the same windows: identical kept sets, weights within 1e-5 relative."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fasp_ext.cli import main
from fasp_ext.io import load_pruned
from test_cli import WORDS, _tokenizer
from tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tiny_llama().save_pretrained(d / "model")
    _tokenizer().save_pretrained(d / "model")
    g = torch.Generator().manual_seed(0)
    for name, n in (("calib", 4000), ("eval", 1000)):
        ids = torch.randint(0, WORDS, (n,), generator=g).tolist()
        (d / f"{name}.txt").write_text(" ".join(f"w{i}" for i in ids))
    return d


def _args(d: Path, out: Path, extra):
    return ["prune", "--model", str(d / "model"), "--calib", str(d / "calib.txt"), "--nsamples", "7",
            "--seqlen", "24", "--batch-size", "2", "--sparsity", "0.25", "--out", str(out), "--quiet", *extra]


def _torchrun(d: Path, args, driver: str | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", FASP_EXT_DIST_TIMEOUT="120")
    target = ["-m", "fasp_ext"] if driver is None else [str(driver)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    return subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600)


def _close(a_dir: Path, b_dir: Path):
    a_cfg = json.loads((a_dir / "config.json").read_text()).get("fasp_ext")
    b_cfg = json.loads((b_dir / "config.json").read_text()).get("fasp_ext")
    assert a_cfg == b_cfg  # the same kept sizes per block
    a, b = load_pruned(a_dir).state_dict(), load_pruned(b_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        rel = (a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)
        assert rel < 1e-5, (k, float(rel))


def _kept(out: Path):
    """The kept unit indices per block, as the report records them (selection, not just sizes)."""
    rep = json.loads((out / "fasp_report.json").read_text())
    return [{k: v for k, v in b.items() if "kept" in k or k in ("v_head_dim", "mlp_width")} for b in rep["blocks"]]


@pytest.mark.parametrize("extra", [[], ["--one-pass"], ["--damp", "auto", "--allocation", "error"], ["--lazy"],
                                   ["--allocation-replan", "--allocation-samples", "2"]],
                         ids=["default", "one-pass", "damp-auto-error-allocation", "lazy", "replan"])
def test_two_processes_equal_one(setup, tmp_path, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    single = [a for a in _args(setup, one, extra)]
    if "--lazy" not in extra:
        single += ["--eval", str(setup / "eval.txt"), "--eval-windows", "5"]
    assert main(single) == 0
    dist_args = _args(setup, two, extra)
    if "--lazy" not in extra:
        dist_args += ["--eval", str(setup / "eval.txt"), "--eval-windows", "5"]
    r = _torchrun(setup, dist_args)
    assert r.returncode == 0, r.stderr[-3000:]
    _close(two, one)
    assert _kept(two) == _kept(one)
    rep1 = json.loads((one / "fasp_report.json").read_text())
    rep2 = json.loads((two / "fasp_report.json").read_text())
    assert rep1["world_size"] == 1 and rep2["world_size"] == 2
    assert rep2["tokens_per_rank"] == [4 * 24, 3 * 24] and rep2["calibration_tokens"] == 7 * 24
    for name, v in rep1["perplexity_after"].items():  # sharded evaluation: the same number
        assert rep2["perplexity_after"][name] == pytest.approx(v, rel=1e-5)
        assert rep2["perplexity_before"][name] == pytest.approx(rep1["perplexity_before"][name], rel=1e-5)
    assert r.stdout.count("saved to") == 1  # one process reports and writes


def test_a_failing_rank_stops_every_rank_and_publishes_nothing(setup, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent("""
        import os, sys
        import fasp_ext.pipeline, fasp_ext.cli
        real = fasp_ext.pipeline.prune
        def prune(*a, **k):
            if os.environ.get("RANK") == "1":
                raise RuntimeError("rank 1 fails on purpose")
            return real(*a, **k)
        fasp_ext.pipeline.prune = prune
        sys.exit(fasp_ext.cli.main(sys.argv[1:]))
    """))
    out = tmp_path / "never"
    r = _torchrun(setup, _args(setup, out, []), driver=driver)
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
