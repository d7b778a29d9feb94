"""The whole pipeline on a GPU: pruning with ``device="cuda"`` gives the model that pruning on the CPU
gives, for every supported family, and the stream check holds there too.

Skipped without a GPU (CI has none); ``bash bench/gpu_check.sh`` runs it on a GPU machine. The model
stays on the CPU and the pipeline moves one block at a time to the GPU, as the CLI does.
"""

from __future__ import annotations

import os

import pytest
import torch

from fasp_ext.adapters import adapter_for
from fasp_ext.pipeline import GRAM_PRECISION_DEFAULT, PruneConfig, prune
from tiny_models import FAMILIES, random_tokens, tiny_family, vocab_size

# FASP_EXT_REQUIRE_CUDA=1 (CI's CUDA step on a GPU machine): no visible GPU is a failure, not a skip
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("FASP_EXT_REQUIRE_CUDA") != "1",
                                reason="no CUDA device")

N, SEQ, BATCH = 6, 24, 4  # a last batch smaller than the others


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kw", [{"allocation": "uniform"}, {}, {"one_pass": True}, {"method": "wanda-sp"}],
                         ids=["uniform", "default", "one-pass", "wanda-sp"])
def test_cuda_prune_equals_cpu_prune(family, kw):
    """fp32 Gram on both devices (the GPU's default, TF32, is compared with its CPU emulation below)."""
    a, b = tiny_family(family), tiny_family(family)
    tokens = random_tokens(N, SEQ, vocab=vocab_size(a))
    kw = dict(kw, gram_precision="fp32")
    ra = prune(a, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, **kw))
    rb = prune(b, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, device="cuda", **kw))
    assert next(b.parameters()).device.type == "cpu"  # the model comes back where it was
    assert ra.params_after == rb.params_after < ra.params_before
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}
    held = random_tokens(3, SEQ, vocab=vocab_size(a), seed=7)
    la, lb = _logits(a, held), _logits(b, held)
    rel = float((la - lb).norm() / la.norm())
    assert rel < 1e-3, f"{family} {kw}: pruned on CUDA vs on CPU, relative logit difference {rel:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_default_gram_is_the_cpu_emulated_precision(family):
    """The GPU's default Gram precision (GRAM_PRECISION_DEFAULT["cuda"], TF32 tensor cores) prunes
    as the CPU's emulation of it does (the accuracy screen measured the emulation): as many
    parameters kept and nearly the same logits. The tolerance is looser than the fp32 comparison's, as
    the hardware's TF32 conversion may round ties (or truncate) differently from the emulation."""
    precision = GRAM_PRECISION_DEFAULT["cuda"]
    assert PruneConfig().gram_precision_on("cuda") == precision
    a, b = tiny_family(family), tiny_family(family)
    tokens = random_tokens(N, SEQ, vocab=vocab_size(a))
    ra = prune(a, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, gram_precision=precision))
    rb = prune(b, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, device="cuda"))
    assert ra.params_after == rb.params_after < ra.params_before
    held = random_tokens(3, SEQ, vocab=vocab_size(a), seed=7)
    la, lb = _logits(a, held), _logits(b, held)
    rel = float((la - lb).norm() / la.norm())
    assert rel < 1e-2, f"{family}: default Gram on CUDA vs its CPU emulation, relative logit difference {rel:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_stream_matches_pruned_model(family):
    """The hidden states the pipeline hands to block i on the GPU equal the pruned model's own."""
    model = tiny_family(family)
    tokens = random_tokens(N, SEQ, vocab=vocab_size(model))
    blocks = adapter_for(model).blocks(model)
    seen = [[] for _ in blocks]
    hs = [b.register_forward_pre_hook(
        lambda _m, args, kwargs, i=i: seen[i].append((args[0] if args else kwargs["hidden_states"]).detach().cpu()),
        with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        prune(model, tokens, PruneConfig(sparsity=0.3, batch_size=BATCH, progress=False, device="cuda"))
    finally:
        for h in hs:
            h.remove()
    with torch.no_grad():
        ref = model.to("cuda")(input_ids=tokens.to("cuda"), output_hidden_states=True, use_cache=False).hidden_states
    nb = -(-N // BATCH)
    for i in range(len(blocks)):
        got, want = torch.cat(seen[i][-nb:], 0), ref[i].cpu()
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-5, f"{family}: block {i} relative stream error {rel:.2e}"
