"""bench/results stays navigable: INDEX.md lists exactly the files there (python bench/index_results.py
rewrites it), and merge_compare names its parts by their place under the output folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_index_lists_every_result_file():
    r = subprocess.run([sys.executable, str(BENCH / "index_results.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_index_check_notices_a_missing_and_an_extra_file(tmp_path, monkeypatch):
    ix = _load("index_results")
    res = tmp_path / "results"
    (res / "screens").mkdir(parents=True)
    for f in ("a.json", "a.md", "screens/b.json"):
        (res / f).write_text("{}")
    monkeypatch.setattr(ix, "RESULTS", res)
    monkeypatch.setattr(ix, "INDEX", res / "INDEX.md")
    monkeypatch.setattr(ix, "commit_of", lambda p: "")
    monkeypatch.setattr(sys, "argv", ["index_results.py"])
    assert ix.main() == 0
    text = (res / "INDEX.md").read_text()
    assert ix.listed(text) == {"a", "screens/b"}
    monkeypatch.setattr(sys, "argv", ["index_results.py", "--check"])
    assert ix.main() == 0
    (res / "screens" / "c.md").write_text("")
    assert ix.main() == 1  # a file the index does not name
    (res / "screens" / "c.md").unlink()
    (res / "a.json").unlink()
    (res / "a.md").unlink()
    assert ix.main() == 1  # the index names a file that is gone


def test_index_rebuilds_a_compare_command_from_the_settings():
    ix = _load("index_results")
    d = {"model": "smollm2", "calib": "austen:emma", "nsamples": 8, "seqlen": 64, "seed": 0,
         "evals": ["jargon"], "eval_windows": {"jargon": 4}, "bos": "auto",
         "rows": [{"method": "dense", "sparsity": 0.0}, {"method": "fasp", "sparsity": 0.2},
                  {"method": "wanda-sp", "sparsity": 0.1}, {"method": "fasp", "sparsity": 0.1}]}
    assert ix.compare_command(d, "screens/x") == (
        "python -m fasp_ext compare --model smollm2 --methods fasp wanda-sp --sparsities 0.1 0.2 --calib austen:emma "
        "--eval jargon --nsamples 8 --seqlen 64 --seed 0 --eval-windows 4 --bos auto --out bench/results/screens --stem x")
    # a row label with a free note (merge_compare's relabelling) is no command
    d["rows"].append({"method": "fasp (cap 2x)", "sparsity": 0.2})
    assert ix.compare_command(d, "x") is None


def test_index_expands_braces_and_globs_in_study_pages():
    ix = _load("index_results")
    assert ix.expand("files `alloc12_{gemma3,smollm2}.json` and `replan4_*.json`.") == {
        "alloc12_gemma3.json", "alloc12_smollm2.json", "replan4_*.json"}


def test_merge_names_parts_relative_to_the_output_folder(tmp_path):
    mc = _load("merge_compare")
    (tmp_path / "screens").mkdir()
    assert mc.source_name(str(tmp_path / "screens" / "a.json"), str(tmp_path)) == "screens/a.json"
    assert mc.source_name(str(tmp_path / "a.json"), str(tmp_path / "screens")) == "a.json"


def test_merging_a_merged_file_again_keeps_its_labels():
    """explicit() keeps the window count it read in the row: a merged file merged again (run_all
    re-runs, a later merge on top) says the same thing, instead of reading a relabelled 12-window
    row as a legacy 16-window one."""
    mc = _load("merge_compare")
    from fasp_ext.pipeline import ALLOCATION_SAMPLES

    base = {"model": "m", "calib": "c", "nsamples": 128, "seqlen": 8, "seed": 0, "evals": ["e"], "eval_windows": {"e": 2}}
    n = ALLOCATION_SAMPLES["error-am"]
    legacy = dict(base, rows=[{"method": "dense", "sparsity": 0.0, "e": 1.0},
                              {"method": "fasp", "sparsity": 0.2, "allocation": "error-am", "e": 2.0}])
    spelled = dict(base, rows=[{"method": f"fasp:allocation_samples={n}", "sparsity": 0.3, "allocation": "error-am",
                                "e": 3.0}])
    once = mc.merge([legacy, spelled], ["a.json", "b.json"])
    labels = {(r["method"], r["sparsity"]) for r in once["rows"]}
    assert (f"fasp:allocation_samples={mc.LEGACY_SAMPLES['error-am']}", 0.2) in labels  # the legacy row says so
    assert ("fasp", 0.3) in labels  # today's default count needs no label
    twice = mc.merge([once], ["merged.json"])
    assert {(r["method"], r["sparsity"]) for r in twice["rows"]} == labels
    assert twice["merged_from"] == ["a.json", "b.json"]
