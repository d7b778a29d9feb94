"""The command line on a tiny local LLaMA-GQA model with a tiny word-level tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from fasp_ext.cli import main
from fasp_ext.io import load_pruned
from tiny_models import tiny_llama

WORDS = 90


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab["[UNK]"] = WORDS
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    m = tiny_llama()
    m.save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    g = torch.Generator().manual_seed(0)
    for name in ("calib", "eval"):
        ids = torch.randint(0, WORDS, (3000,), generator=g).tolist()
        (d / f"{name}.txt").write_text(" ".join(f"w{i}" for i in ids))
    (d / "empty.txt").write_text("")
    return d


def _prune_args(model_dir, texts, out, *extra):
    return ["prune", "--model", str(model_dir), "--calib", str(texts / "calib.txt"), "--nsamples", "4",
            "--seqlen", "32", "--out", str(out), "--quiet", "--eval", str(texts / "eval.txt"),
            "--eval-windows", "4", *extra]


def test_prune_then_eval(model_dir, texts, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_prune_args(model_dir, texts, out, "--sparsity", "0.25", "--allocation", "error")) == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "perplexity on" in printed
    rep = json.loads((out / "fasp_report.json").read_text())
    assert rep["params_after"] < rep["params_before"]
    assert set(rep["perplexity_after"]) == {str(texts / "eval.txt")}
    m = load_pruned(out)
    # the error curves per structure move value channels between blocks, keeping the uniform total (2 x 12)
    assert m.config.fasp_ext["v_head_dim"] == [b["v_head_dim"] for b in rep["blocks"]]
    assert sum(m.config.fasp_ext["v_head_dim"]) == 24
    assert main(["eval", "--model", str(out), "--data", str(texts / "eval.txt"), "--seqlen", "32",
                 "--eval-windows", "4", "--quiet", "--json", str(tmp_path / "e.json")]) == 0
    after = json.loads((tmp_path / "e.json").read_text())[str(texts / "eval.txt")]
    assert after == pytest.approx(rep["perplexity_after"][str(texts / "eval.txt")], rel=1e-5)


def test_allocation_flags_reach_the_run(model_dir, texts, tmp_path):
    out = tmp_path / "pruned"
    assert main(_prune_args(model_dir, texts, out, "--sparsity", "0.25", "--allocation-samples", "2",
                            "--allocation-replan")) == 0
    rep = json.loads((out / "fasp_report.json").read_text())
    assert rep["allocation_replan"] is True and rep["allocation_windows"] == 2 and rep["allocation"] == "error-am"
    assert rep["params_after"] < rep["params_before"]


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--seqlen", "4096"], "seqlen"),
    (["--nsamples", "0"], "nsamples"),
    (["--damp", "lots"], "--damp"),
    (["--method", "nope"], "method"),
    (["--allocation-replan", "--one-pass"], "allocation_replan needs sequential mode"),
    (["--allocation-samples", "-1"], "allocation_samples must be >= 0"),
])
def test_bad_arguments_write_nothing(model_dir, texts, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert main(_prune_args(model_dir, texts, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(model_dir, texts, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(_prune_args(model_dir, texts, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(_prune_args(model_dir, texts, out, "--overwrite")) == 0
    assert (out / "config.json").is_file()


def test_missing_model_and_bad_calibration(model_dir, texts, tmp_path, capsys):
    args = _prune_args(model_dir, texts, tmp_path / "o")
    bad_model = list(args)
    bad_model[bad_model.index("--model") + 1] = str(tmp_path / "no_such_model")
    assert main(bad_model) == 2
    assert "no_such_model" in capsys.readouterr().err
    for calib in (texts / "empty.txt", tmp_path / "missing.txt"):
        a = list(args)
        a[a.index("--calib") + 1] = str(calib)
        assert main(a) == 2
        assert capsys.readouterr().err.strip()
    assert not (tmp_path / "o").exists()


def test_compare_ranks_methods_and_writes_tables(model_dir, texts, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(model_dir), "--calib", str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"),
            "--nsamples", "4", "--seqlen", "32", "--eval-windows", "4", "--quiet", "--out", str(out), "--stem", "t",
            "--methods", "wanda-sp", "fasp", "fasp:allocation=flap,selection=obs", "--sparsities", "0", "0.25"]
    assert main(args) == 0
    res = json.loads((out / "t.json").read_text())
    rows = {(r["method"], r["sparsity"]): r for r in res["rows"]}
    assert len(rows) == 7 and (out / "t.md").exists() and (out / "t.png").exists()
    key = str(texts / "eval.txt")
    # sparsity 0 changes nothing, whatever the method
    for m in ("wanda-sp", "fasp", "fasp:allocation=flap,selection=obs"):
        assert rows[(m, 0.0)][key] == pytest.approx(rows[("dense", 0.0)][key], rel=1e-5)
        assert rows[(m, 0.25)]["params"] < rows[("dense", 0.0)]["params"]
    assert not list(out.glob("*.tmp"))


def test_compare_bos_flag(model_dir, texts, tmp_path):
    """compare --bos decides whether calibration and evaluation windows start with BOS, as prune and
    eval do, and records it; 'always' with a tokenizer that has no BOS is refused before any work."""
    import shutil

    with_bos = tmp_path / "with_bos"
    shutil.copytree(model_dir, with_bos)
    tok = _tokenizer()
    tok.bos_token = "w0"  # has a BOS but does not add it when encoding: auto gives no BOS
    tok.save_pretrained(with_bos)
    dense = {}
    for bos in ("never", "always"):
        out = tmp_path / f"cmp_{bos}"
        args = ["compare", "--model", str(with_bos), "--calib", str(texts / "calib.txt"), "--eval",
                str(texts / "eval.txt"), "--nsamples", "2", "--seqlen", "16", "--eval-windows", "2", "--quiet",
                "--out", str(out), "--methods", "fasp", "--sparsities", "0", "--bos", bos]
        assert main(args) == 0
        res = json.loads((out / "compare.json").read_text())
        assert res["bos"] == bos
        dense[bos] = res["rows"][0][str(texts / "eval.txt")]
    assert dense["never"] != pytest.approx(dense["always"], rel=1e-6)
    args = ["compare", "--model", str(model_dir), "--calib", str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"),
            "--out", str(tmp_path / "c"), "--methods", "fasp", "--quiet", "--bos", "always"]
    assert main(args) == 2
    assert not (tmp_path / "c").exists()


def test_compare_rejects_a_bad_method_before_any_work(model_dir, texts, tmp_path):
    args = ["compare", "--model", str(model_dir), "--calib", str(texts / "calib.txt"), "--eval", str(texts / "eval.txt"),
            "--out", str(tmp_path / "c"), "--methods", "fasp:allocation=owl", "--quiet"]
    assert main(args) != 0
    assert not (tmp_path / "c").exists()


def test_merge_spells_out_the_allocation_of_rows_from_before_the_default_changed():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("merge_compare", Path(__file__).parents[1] / "bench" / "merge_compare.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    base = {"model": "m", "calib": "c", "nsamples": 1, "seqlen": 8, "seed": 0, "evals": ["e"], "eval_windows": {"e": 1}}
    old = dict(base, rows=[{"method": "dense", "sparsity": 0.0, "e": 1.0},
                           {"method": "fasp", "sparsity": 0.3, "e": 3.0},
                           {"method": "fasp:damp=auto", "sparsity": 0.3, "e": 4.0},
                           {"method": "fasp:allocation=flap", "sparsity": 0.3, "e": 2.0},
                           {"method": "wanda-sp", "sparsity": 0.3, "e": 5.0}])
    new = dict(base, rows=[{"method": "fasp", "sparsity": 0.3, "e": 2.5, "allocation": "flap"},  # the old default
                           {"method": "fasp (cap 2x)", "sparsity": 0.3, "e": 2.7, "allocation": "flap"},
                           {"method": "fasp:allocation_samples=16", "sparsity": 0.3, "e": 6.0, "allocation": "flap"},
                           # today's default spelled out: FASP as it prunes today, so plain "fasp"
                           {"method": "fasp:allocation=error,allocation_samples=16", "sparsity": 0.3, "e": 1.5,
                            "allocation": "error"},
                           {"method": "fasp:allocation_samples=32", "sparsity": 0.3, "e": 1.6, "allocation": "error"},
                           {"method": "fasp:allocation=error-am", "sparsity": 0.3, "e": 1.4, "allocation": "error-am"}])
    rows = {(r["method"], r.get("allocation")): r["e"] for r in mc.merge([old, new], ["a.json", "b.json"])["rows"]}
    assert rows == {("dense", None): 1.0, ("fasp:allocation=uniform", "uniform"): 3.0,
                    ("fasp:damp=auto,allocation=uniform", "uniform"): 4.0, ("fasp:allocation=flap", "flap"): 2.5,
                    ("wanda-sp", "uniform"): 5.0, ("fasp:allocation=flap (cap 2x)", "flap"): 2.7,
                    ("fasp:allocation_samples=16,allocation=flap", "flap"): 6.0, ("fasp:allocation=error", "error"): 1.5,
                    ("fasp:allocation_samples=32,allocation=error", "error"): 1.6, ("fasp", "error-am"): 1.4}
    with pytest.raises(SystemExit, match="settings differ"):
        mc.merge([old, dict(new, seqlen=16)], ["a.json", "b.json"])


def test_merge_marks_unweighted_fasp_rows_where_the_model_weighs_tokens():
    """Where a row says FASP weighed the tokens (Gemma), FASP rows run without it (or from before the
    field) say token_weighting=none; on a model where no row did (LLaMA: a no-op), nothing changes."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("merge_compare", Path(__file__).parents[1] / "bench" / "merge_compare.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    base = {"model": "m", "calib": "c", "nsamples": 1, "seqlen": 8, "seed": 0, "evals": ["e"], "eval_windows": {"e": 1}}
    old = dict(base, rows=[{"method": "fasp", "sparsity": 0.2, "e": 3.0, "allocation": "error-am"},
                           {"method": "wanda-sp", "sparsity": 0.2, "e": 5.0, "allocation": "uniform"}])
    new = dict(base, rows=[{"method": "fasp", "sparsity": 0.2, "e": 2.0, "allocation": "error-am", "token_weighting": "auto"},
                           {"method": "fasp:token_weighting=none", "sparsity": 0.1, "e": 4.0, "allocation": "error-am",
                            "token_weighting": "none"}])
    merged = mc.merge([old, new], ["a.json", "b.json"])["rows"]
    assert [(r["method"], r["sparsity"], r["e"]) for r in merged] == [
        ("fasp:token_weighting=none", 0.1, 4.0), ("fasp", 0.2, 2.0), ("fasp:token_weighting=none", 0.2, 3.0),
        ("wanda-sp", 0.2, 5.0)]
    plain = mc.merge([old], ["a.json"])["rows"]
    assert [r["method"] for r in plain] == ["fasp", "wanda-sp"]


def test_merge_spells_out_the_allocation_window_count():
    """error-am rows from before rows recorded their allocation pass's windows ran with 16; a row
    whose count differs from today's default (on the result's calibration windows) says so."""
    import importlib.util
    from pathlib import Path

    from fasp_ext.pipeline import ALLOCATION_SAMPLES

    spec = importlib.util.spec_from_file_location("merge_compare", Path(__file__).parents[1] / "bench" / "merge_compare.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    today = ALLOCATION_SAMPLES["error-am"]
    assert today != 16
    base = {"model": "m", "calib": "c", "nsamples": 128, "seqlen": 8, "seed": 0, "evals": ["e"], "eval_windows": {"e": 1}}
    old = dict(base, rows=[{"method": "fasp", "sparsity": 0.2, "e": 3.0, "allocation": "error-am"}])
    new = dict(base, rows=[{"method": f"fasp:allocation_samples={today}", "sparsity": 0.2, "e": 2.0,
                            "allocation": "error-am", "allocation_windows": today},
                           {"method": "fasp", "sparsity": 0.3, "e": 4.0, "allocation": "error-am", "allocation_windows": 8},
                           {"method": "fasp:one_pass=true", "sparsity": 0.3, "e": 5.0, "allocation": "error-am",
                            "allocation_windows": None}])
    merged = mc.merge([old, new], ["a.json", "b.json"])["rows"]
    assert [(r["method"], r["sparsity"], r["e"]) for r in merged] == [
        ("fasp", 0.2, 2.0), ("fasp:allocation_samples=16", 0.2, 3.0), ("fasp:allocation_samples=8", 0.3, 4.0),
        ("fasp:one_pass=true", 0.3, 5.0)]
    # on fewer calibration windows than either count, both used them all: the same setting
    few = mc.merge([dict(old, nsamples=8)], ["a.json"])["rows"]
    assert [r["method"] for r in few] == ["fasp"]


@pytest.mark.parametrize("lazy", [False, True])
def test_prune_multimodal_gemma3(texts, tmp_path, capsys, lazy):
    """A Gemma3ForConditionalGeneration folder (saved in transformers' original layout) prunes from
    the command line, in memory and --lazy alike, and the output reloads and evaluates."""
    from tiny_models import tiny_family

    src = tmp_path / "gemma3"
    tiny_family("gemma3").save_pretrained(src)
    _tokenizer().save_pretrained(src)
    out = tmp_path / "pruned"
    args = _prune_args(src, texts, out, "--sparsity", "0.25", "--seqlen", "24")
    if lazy:
        args = [a for a in args if a not in ("--eval", str(texts / "eval.txt"))] + ["--lazy"]
    assert main(args) == 0
    rep = json.loads((out / "fasp_report.json").read_text())
    assert rep["params_after"] < rep["params_before"]
    assert load_pruned(out).config.model_type == "gemma3"
    assert main(["eval", "--model", str(out), "--data", str(texts / "eval.txt"), "--seqlen", "24",
                 "--eval-windows", "4", "--quiet", "--json", str(tmp_path / "e.json")]) == 0


def test_bench_ops_merge_keeps_where_each_kept_size_was_measured():
    """``bench_ops.py --merge`` twice: rows kept across two merges still name the run that measured
    them, not the merge in between (which only re-ran other sizes)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_ops", Path(__file__).parents[1] / "bench" / "bench_ops.py")
    bo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bo)
    run = lambda d: {"date": d, "git_commit": "g" + d, "command": "c" + d,  # noqa: E731
                     "load_average_at_start": 0.1, "load_average_at_end": 0.2}
    row = lambda size, t, ms: {"size": size, "threads": t, "op": "o", "case": "c", "times": {"op": ms}}  # noqa: E731
    first = {"machine": run("1"), "results": [row("llama7b", 1, 1.0), row("smollm2", 1, 2.0)]}
    # second run: smollm2 only, merged into the first
    rows, runs = bo.merge_rows(first, [row("smollm2", 1, 3.0)], {"smollm2"})
    assert [(r["size"], r["times"]["op"]) for r in rows] == [("smollm2", 3.0), ("llama7b", 1.0)]
    assert runs == [{**run("1"), "sizes": ["llama7b"]}]
    second = {"machine": {**run("2"), "merged_from": runs}, "results": rows}
    # third run: smollm2 again; llama7b still comes from run 1
    rows, runs = bo.merge_rows(second, [row("smollm2", 1, 4.0)], {"smollm2"})
    assert runs == [{**run("1"), "sizes": ["llama7b"]}]
    # third run of llama7b only: smollm2 comes from run 2 now
    rows, runs = bo.merge_rows(second, [row("llama7b", 2, 5.0)], {"llama7b"})
    assert runs == [{**run("2"), "sizes": ["smollm2"]}]
    # a file from before the list: one dict and merged_sizes
    old_style = {"machine": {**run("2"), "merged_from": run("1"), "merged_sizes": ["llama7b"]}, "results": rows}
    assert bo.merge_rows(old_style, [], {"smollm2"})[1] == [{**run("1"), "sizes": ["llama7b"]}]
    md = bo.to_markdown({**run("3"), "device": "cpu", "cpu": "x", "cores": 2, "torch": "t", "python": "p",
                         "merged_from": [{**run("1"), "sizes": ["llama7b"]}]}, [])
    assert "rows of llama7b kept from an earlier run: 1, git g1, `c1`" in md


def test_profile_restore_writes_its_tables_and_rejects_unknown_sizes(tmp_path, capsys):
    """``bench/profile_restore.py`` on the CPU: the torch pipeline it profiles is checked against the op
    (bench_ops.torch_restore_baselines), both functions get a row and a table; an unknown size or a
    call count below 1 is an error naming the argument, with nothing written."""
    import importlib.util
    import json
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench"
    spec = importlib.util.spec_from_file_location("profile_restore", bench / "profile_restore.py")
    pr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pr)
    for bad, name in ((["--sizes", "gpt5"], "--sizes"), (["--calls", "0"], "--calls")):
        with pytest.raises(SystemExit):
            pr.main(["--device", "cpu", "--out", str(tmp_path / "bad"), *bad])
        assert name in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    assert pr.main(["--device", "cpu", "--sizes", "smollm2", "--calls", "1", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "restore_profile_cpu.md").read_text()
    assert "| op |" in md and "| torch R-RHS |" in md
    res = json.loads((tmp_path / "restore_profile_cpu.json").read_text())["results"]["smollm2"]
    assert res["op"]["wall_ms_per_call"] > 0 and any("restore" in t["name"] for t in res["op"]["top"])
    assert any("cholesky" in t["name"] for t in res["torch R-RHS"]["top"])
