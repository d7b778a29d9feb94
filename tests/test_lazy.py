"""Block-by-block loading (fasp_ext/lazy.py): the same result as in-memory pruning, one block in
memory at a time, whatever the depth."""

from __future__ import annotations

import json

import pytest
import torch

from fasp_ext.cli import main
from fasp_ext.io import load_pruned, save_pruned
from fasp_ext.lazy import LazyBlocks, prune_checkpoint
from fasp_ext.pipeline import PruneConfig, prune
from tiny_models import FAMILIES, random_tokens, tiny_family, tiny_llama


def _same_state(a_dir, b_dir):
    a, b = load_pruned(a_dir).state_dict(), load_pruned(b_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", [None, "uniform", "replan"])
def test_lazy_equals_in_memory_pruning(tmp_path, family, allocation):
    tiny_family(family).save_pretrained(tmp_path / "src", max_shard_size="30KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2  # a sharded input
    toks = random_tokens(4, 24)
    replan = allocation == "replan"  # the default allocation, re-decided block by block
    cfg = lambda: PruneConfig(sparsity=0.25, allocation=None if replan else allocation,  # noqa: E731
                              allocation_replan=replan, progress=False)
    rep = prune_checkpoint(tmp_path / "src", tmp_path / "lazy", toks, cfg())
    m = tiny_family(family)
    mem = prune(m, toks, cfg())
    save_pruned(m, tmp_path / "mem")
    _same_state(tmp_path / "lazy", tmp_path / "mem")
    assert (rep["params_before"], rep["params_after"]) == (mem.params_before, mem.params_after)
    assert rep["peak_blocks_in_memory"] == 1
    assert (tmp_path / "lazy" / "model.safetensors.index.json").is_file()


class _Spy(LazyBlocks):
    """Records, at every fetch, which blocks hold real storage and how many bytes they take."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.events = []

    def _real_blocks(self):
        return [j for j, b in enumerate(self.blocks) if any(not p.is_meta for p in b.parameters())]

    def fetch(self, blocks, i, device):
        assert self._real_blocks() == [], f"block(s) {self._real_blocks()} in memory before block {i}'s turn"
        block = super().fetch(blocks, i, device)
        nbytes = sum(p.numel() * p.element_size() for b in self.blocks for p in b.parameters() if not p.is_meta)
        self.events.append((i, self._real_blocks(), nbytes))
        return block


@pytest.mark.parametrize("layers", [2, 6])
def test_one_block_at_a_time_and_memory_independent_of_depth(tmp_path, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    spy = _Spy(tmp_path / "src")
    assert all(p.is_meta for b in spy.blocks for p in b.parameters())  # nothing loaded up front
    prune(spy.model, random_tokens(2, 16), PruneConfig(sparsity=0.25, progress=False), mover=spy)
    # default allocation: a dense pass, then the pruning pass; each block in memory alone, in order
    assert [e[0] for e in spy.events] == list(range(layers)) * 2
    assert all(e[1] == [e[0]] for e in spy.events)
    one_block = sum(p.numel() * p.element_size() for p in LlamaForCausalLM(cfg).model.layers[0].parameters())
    assert max(e[2] for e in spy.events) == one_block  # the same for 2 and 6 blocks


def test_cli_prunes_lazily_by_default_and_evaluates_the_written_result(tmp_path, capsys):
    """The default for a local folder is block by block (report: lazy), bitwise what --no-lazy
    writes; with --eval the perplexities before and after equal the in-memory run's."""
    from test_cli import WORDS, _tokenizer

    src = tmp_path / "model"
    tiny_llama().save_pretrained(src)
    _tokenizer().save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    (tmp_path / "c.txt").write_text(" ".join(f"w{i}" for i in torch.randint(0, WORDS, (2000,), generator=g).tolist()))
    args = ["prune", "--model", str(src), "--calib", str(tmp_path / "c.txt"), "--nsamples", "4", "--seqlen", "16",
            "--quiet", "--sparsity", "0.25"]
    assert main(args + ["--out", str(tmp_path / "lazy")]) == 0
    assert main(args + ["--out", str(tmp_path / "mem"), "--no-lazy"]) == 0
    _same_state(tmp_path / "lazy", tmp_path / "mem")
    rep = json.loads((tmp_path / "lazy" / "fasp_report.json").read_text())
    assert rep["lazy"] and rep["peak_blocks_in_memory"] == 1
    assert not json.loads((tmp_path / "mem" / "fasp_report.json").read_text())["lazy"]
    assert (tmp_path / "lazy" / "tokenizer.json").is_file()
    ev = ["--eval", str(tmp_path / "c.txt"), "--eval-windows", "8"]
    assert main(args + ["--out", str(tmp_path / "lazy_ev")] + ev) == 0
    assert main(args + ["--out", str(tmp_path / "mem_ev"), "--no-lazy"] + ev) == 0
    _same_state(tmp_path / "lazy_ev", tmp_path / "mem")
    a, b = (json.loads((tmp_path / d / "fasp_report.json").read_text()) for d in ("lazy_ev", "mem_ev"))
    assert a["lazy"] and not b["lazy"]
    for when in ("perplexity_before", "perplexity_after"):
        assert set(a[when]) == {str(tmp_path / "c.txt")}
        assert a[when] == pytest.approx(b[when], rel=1e-6)
    assert a["perplexity_after"] != a["perplexity_before"]  # the pruned model was evaluated, not the dense one
    assert a["eval_windows"] == b["eval_windows"] == {str(tmp_path / "c.txt"): 8}
    assert "perplexity" in (tmp_path / "lazy_ev" / "README.md").read_text()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_offloaded_activations_give_the_same_model(device):
    toks = random_tokens(4, 24)
    a, b = tiny_llama(), tiny_llama()
    prune(a, toks, PruneConfig(sparsity=0.25, progress=False, device=device))
    prune(b, toks, PruneConfig(sparsity=0.25, progress=False, device=device, offload_activations=True))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7), k


def test_lazy_counts_a_tied_embedding_once(tmp_path):
    """The LM head tied to the embedding is one parameter in the lazy report as in memory (it was
    counted twice once the embeddings were freed: 'parameters: 3.2 M -> 6.4 M')."""
    from transformers import LlamaForCausalLM

    m = tiny_llama()
    m = LlamaForCausalLM(m.config.__class__(**{**m.config.to_dict(), "tie_word_embeddings": True}))
    m.save_pretrained(tmp_path / "src")
    toks = random_tokens(4, 24)
    rep = prune_checkpoint(tmp_path / "src", tmp_path / "lazy", toks, PruneConfig(sparsity=0.25, progress=False))
    mem = prune(m, toks, PruneConfig(sparsity=0.25, progress=False))
    assert (rep["params_before"], rep["params_after"]) == (mem.params_before, mem.params_after)
    assert rep["params_after"] < rep["params_before"]
