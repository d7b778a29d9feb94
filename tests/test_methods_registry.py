"""Methods, selections, allocations and restorations as registered parts (fasp_ext/methods.py).

The magnitude baseline is the worked example of docs/adding-a-method.md: its part is one
registration, and its test is ``test_magnitude_keeps_the_largest_columns_unrestored`` below (a
reference computed from the dense model's weights, not from the pipeline)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fasp_ext import methods
from fasp_ext.adapters import adapter_for
from fasp_ext.pipeline import PruneConfig, kept_count, prune
from tiny_models import random_tokens, tiny_llama, tiny_opt


@pytest.fixture
def registered():
    """Parts a test registers, removed again afterwards."""
    added: list[tuple[methods.Registry, str]] = []

    def add(registry, name):
        added.append((registry, name))

    yield add
    for registry, name in added:
        registry.pop(name, None)


@pytest.mark.parametrize("maker", [tiny_llama, tiny_opt])
def test_magnitude_keeps_the_largest_columns_unrestored(maker):
    dense = maker()
    model = maker()
    prune(model, random_tokens(4, 16), PruneConfig(method="magnitude", sparsity=0.3, progress=False))
    a = adapter_for(model)
    for bd, bp in zip(a.blocks(dense), a.blocks(model)):
        W = a.mlp_pair(bd)[1].weight.detach()
        k = kept_count(W.shape[1], 0.3, 8)
        want = torch.topk(W.norm(dim=0), k).indices.sort().values  # the k largest column norms
        got = a.mlp_pair(bp)[1].weight.detach()
        assert got.shape == (W.shape[0], k)
        assert torch.equal(got, W[:, want])  # no restoration: the kept columns as they were
        down_bias = a.mlp_pair(bd)[1].bias
        if down_bias is not None:  # no bias compensation either
            assert torch.equal(a.mlp_pair(bp)[1].bias, down_bias)
        for lin_d, lin_p in zip(a.mlp_pair(bd)[0], a.mlp_pair(bp)[0]):
            assert torch.equal(lin_p.weight, lin_d.weight[want])


def test_a_registered_method_prunes_with_no_pipeline_edit(registered):
    """A new method is one registration: here the opposite of magnitude (the smallest columns kept),
    checked against its own reference; and a copy of magnitude's part prunes bit for bit as the
    built-in does."""
    methods.register_method("smallest-norm", help="test only")(lambda W, stats, gen: -W.float().norm(dim=0))
    registered(methods.METHODS, "smallest-norm")
    dense, model = tiny_llama(), tiny_llama()
    rep = prune(model, random_tokens(4, 16), PruneConfig(method="smallest-norm", sparsity=0.25, progress=False))
    assert rep.method == "smallest-norm" and rep.allocation == "uniform"
    a = adapter_for(model)
    W = a.mlp_pair(a.blocks(dense)[0])[1].weight.detach()
    k = kept_count(W.shape[1], 0.25, 8)
    want = torch.topk(-W.norm(dim=0), k).indices.sort().values
    assert torch.equal(a.mlp_pair(a.blocks(model)[0])[1].weight, W[:, want])

    methods.register_method(methods.Method("magnitude-copy", score=methods.METHODS["magnitude"].score))
    registered(methods.METHODS, "magnitude-copy")
    x, y = tiny_llama(), tiny_llama()
    toks = random_tokens(4, 16)
    prune(x, toks, PruneConfig(method="magnitude", progress=False))
    prune(y, toks, PruneConfig(method="magnitude-copy", progress=False))
    for (n, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items()):
        assert torch.equal(p, q), n


def test_a_registered_allocation_is_used_and_checked(registered):
    """An allocation is one registration too: a copy of "error" allocates exactly as "error" does,
    and it is refused with allocation_replan unless it says it replans."""
    err = methods.ALLOCATIONS["error"]
    methods.register_allocation("error-copy", needs_gram=True, windows=16)(err.costs)
    registered(methods.ALLOCATIONS, "error-copy")
    toks = random_tokens(8, 24)
    x, y = tiny_llama(), tiny_llama()
    rx = prune(x, toks, PruneConfig(sparsity=0.25, allocation="error", progress=False))
    ry = prune(y, toks, PruneConfig(sparsity=0.25, allocation="error-copy", progress=False))
    assert [b["mlp_width"] for b in rx.blocks] == [b["mlp_width"] for b in ry.blocks]
    assert len({b["mlp_width"] for b in rx.blocks} | {b["v_head_dim"] for b in rx.blocks}) > 1  # not uniform
    for (n, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="allocation_replan needs .*'error' or 'error-am', got .*'error-copy'"):
        PruneConfig(allocation="error-copy", allocation_replan=True).validate()


def test_the_command_line_choices_are_the_tables(registered):
    from fasp_ext.cli import build_parser

    def choices(parser, dest):
        sub = next(a for a in parser._actions if a.dest == "cmd").choices["prune"]
        return next(a for a in sub._actions if a.dest == dest)

    p = build_parser()
    assert choices(p, "selection").choices == ["score", "obs", "spap"]
    assert choices(p, "allocation").choices == ["uniform", "error", "error-am", "flap", "flap-am"]
    assert choices(p, "method").help == "fasp, wanda-sp, flap, depth2, magnitude, random"
    methods.register_selection("first-k")(lambda cfg, method, W, stats, k, groups, segments, gen: torch.arange(k))
    registered(methods.SELECTIONS, "first-k")
    assert "first-k" in choices(build_parser(), "selection").choices


def test_each_part_checks_its_own_rules():
    # unknown names list what is registered
    with pytest.raises(ValueError, match="method must be one of fasp, wanda-sp, flap, depth2, magnitude, random"):
        PruneConfig(method="obs").validate()
    with pytest.raises(ValueError, match="selection must be one of score, obs, spap, got 'best'"):
        PruneConfig(selection="best").validate()
    # the selection's: obs/spap model the restoration (only fasp's), spap its rounds
    with pytest.raises(ValueError, match="selection='obs' needs method 'fasp' .*got 'depth2'"):
        PruneConfig(selection="obs", method="depth2").validate()
    with pytest.raises(ValueError, match="spap_rounds must be >= 1"):
        PruneConfig(selection="spap", spap_rounds=0).validate()
    # the restoration's: a dense target needs fasp, sequential mode, a numeric damp and no intercept
    for kw in ({"method": "flap"}, {"one_pass": True}, {"damp": "auto"}, {"intercept": True}):
        with pytest.raises(ValueError, match="target='dense' needs method 'fasp'"):
            PruneConfig(target="dense", **kw).validate()
    PruneConfig(target="dense").validate()
    # the parts' flags stand for the old name tests
    assert [n for n in methods.METHODS if PruneConfig(method=n).restores] == ["fasp", "depth2"]
    assert [n for n in methods.METHODS if PruneConfig(method=n).fits_intercept] == ["depth2"]
    assert PruneConfig(intercept=True).fits_intercept
    assert PruneConfig(mlp_sparsity=0.3).allocation_kind == "error"
    assert PruneConfig(method="flap", mlp_sparsity=0.3).allocation_kind == "flap"


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="method 'fasp' is registered already"):
        methods.register_method(methods.Method("fasp"))
    with pytest.raises(ValueError, match="allocation 'error' is registered already"):
        methods.register_allocation(methods.Allocation("error"))


def test_allocation_imports_without_the_pipeline():
    """The unit geometry lives in fasp_ext/units.py: allocation no longer imports the pipeline."""
    code = ("import sys, fasp_ext.allocation as a; assert 'fasp_ext.pipeline' not in sys.modules, 'pipeline'; "
            "assert list(a.ALLOCATIONS) == ['uniform', 'error', 'error-am', 'flap', 'flap-am']")
    subprocess.run([sys.executable, "-c", code], check=True)
