"""llm-compressor (FASPModifier) and lm-eval (fasp-ext eval --tasks) integrations, on tiny local models.

Each is checked against a reference computed here: the modifier against ``fasp_ext.prune`` on the
same calibration windows (same kept sizes, same weights, and the folder oneshot saved reloads
with ``fasp_ext.load_pruned`` to the same logits); the harness's loglikelihoods for a local
multiple-choice task against log-probabilities computed directly with the model.

These need ``llmcompressor`` / ``lm_eval`` (CI installs them in their own venv, .ci/run stage 3).
Without them the tests skip, unless FASP_EXT_REQUIRE_INTEGRATIONS=1, which makes a missing package a
failure (CI sets it).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import fasp_ext
from fasp_ext.cli import main
from fasp_ext.safety import UserError
from tiny_models import tiny_llama

REQUIRE = os.environ.get("FASP_EXT_REQUIRE_INTEGRATIONS") == "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
WORDS = 90


def _need(module: str):
    if REQUIRE:
        return __import__(module)
    return pytest.importorskip(module, reason=f"needs {module} (FASP_EXT_REQUIRE_INTEGRATIONS=1 makes this a failure)")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab["[UNK]"] = WORDS
    vocab["[EOS]"] = WORDS + 1
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


def _windows(n: int, seqlen: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, WORDS, (n, seqlen), generator=g)


def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _assert_same_model(a, b, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, (k, sa[k].shape, sb[k].shape)
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-4, msg=k)


# ----------------------------------------------------------------------------- llm-compressor

def test_collect_windows_drops_padding_stacks_or_concatenates():
    _need("llmcompressor")
    from fasp_ext.integrations.llmcompressor import collect_windows

    a = torch.arange(10).reshape(2, 5)
    same = collect_windows([{"input_ids": a, "attention_mask": torch.ones_like(a)}])
    assert torch.equal(same, a)
    # right- and left-padded rows: padding dropped, then unequal lengths are concatenated into
    # windows of the longest sample (4 here): [1 2 3 7 8 9 10 11 12] -> two windows, tail dropped
    ids = torch.tensor([[1, 2, 3, 0], [7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = collect_windows([{"input_ids": ids, "attention_mask": mask}, {"input_ids": torch.tensor([[0, 11, 12]]),
                                                                         "attention_mask": torch.tensor([[0, 1, 1]])}])
    assert out.tolist() == [[1, 2, 3, 7], [8, 9, 10, 11]]
    assert collect_windows([{"input_ids": ids, "attention_mask": mask}], seqlen=3).tolist() == [[1, 2, 3], [7, 8, 9]]
    with pytest.raises(ValueError, match="no tokens"):
        collect_windows([])


def test_fasp_modifier_matches_prune_and_reloads(model_dir, tmp_path):
    _need("llmcompressor")
    from datasets import Dataset
    from llmcompressor import oneshot

    from fasp_ext.integrations.llmcompressor import FASPModifier

    toks = _windows(12, 32)
    ds = Dataset.from_dict({"input_ids": toks.tolist(), "attention_mask": torch.ones_like(toks).tolist()})
    model = _load(model_dir)
    mod = FASPModifier(sparsity=0.25, progress=False, options={"max_block_sparsity": 0.5})
    out = tmp_path / "oneshot_out"
    oneshot(model=model, dataset=ds, recipe=[mod], num_calibration_samples=12, max_seq_length=32,
            shuffle_calibration_samples=False, output_dir=str(out))
    assert mod.report is not None and mod.report.params_after < mod.report.params_before

    ref = _load(model_dir)
    rep = fasp_ext.prune(ref, toks, fasp_ext.PruneConfig(sparsity=0.25, progress=False, max_block_sparsity=0.5))
    sizes = lambda r: [(b["block"], b.get("v_head_dim"), b.get("mlp_width")) for b in r.blocks]  # noqa: E731
    assert sizes(mod.report) == sizes(rep)
    assert mod.report.calibration_tokens == rep.calibration_tokens == toks.numel()
    _assert_same_model(model, ref)

    # oneshot's output folder reloads with fasp_ext.load_pruned to the same function
    cfg = json.loads((out / "config.json").read_text())
    assert "fasp_ext" in cfg, "the saved config lost the pruned sizes"
    back = fasp_ext.load_pruned(out)
    _assert_same_model(back, ref)
    x = _windows(2, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)


def test_fasp_modifier_from_yaml_recipe_with_unequal_samples(model_dir, tmp_path):
    _need("llmcompressor")
    from datasets import Dataset
    from llmcompressor import oneshot

    from fasp_ext.integrations.llmcompressor import FASPModifier  # noqa: F401  (registers the name)

    g = torch.Generator().manual_seed(11)
    rows = [torch.randint(0, WORDS, (int(n),), generator=g) for n in (40, 25, 33, 40, 18, 29)]
    ds = Dataset.from_dict({"input_ids": [r.tolist() for r in rows], "attention_mask": [[1] * len(r) for r in rows]})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("fasp_stage:\n  pruning_modifiers:\n    FASPModifier:\n      sparsity: 0.3\n"
                      "      seqlen: 24\n      progress: false\n      options: {allocation: uniform}\n")
    model = _load(model_dir)
    oneshot(model=model, dataset=ds, recipe=str(recipe), num_calibration_samples=len(rows), max_seq_length=64,
            shuffle_calibration_samples=False)
    # the reference: the same samples concatenated and cut into 24-token windows, by hand, in the order
    # oneshot's dataloader gives them (llm-compressor's length-aware sampler: longest first)
    stream = torch.cat(sorted(rows, key=lambda r: -r.numel()))
    toks = stream[: stream.numel() // 24 * 24].reshape(-1, 24)
    ref = _load(model_dir)
    fasp_ext.prune(ref, toks, fasp_ext.PruneConfig(sparsity=0.3, allocation="uniform", progress=False))
    _assert_same_model(model, ref)


def test_fasp_modifier_argument_errors():
    _need("llmcompressor")
    from fasp_ext.integrations.llmcompressor import FASPModifier

    with pytest.raises(ValueError, match="sparsity"):
        FASPModifier(sparsity=1.5)
    with pytest.raises(ValueError, match="unknown PruneConfig option"):
        FASPModifier(options={"sparsty": 0.2})


# ----------------------------------------------------------------------------- the model oneshot hands back
# What a user runs (llm-compressor's own examples): oneshot with FASP pruning value channels, then a forward
# and model.generate on the model object oneshot worked on, in memory.

def _dataset(toks):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": toks.tolist(), "attention_mask": torch.ones_like(toks).tolist()})


def _value_pruned(report, hd):
    return [b["v_head_dim"] for b in report.blocks if b.get("v_head_dim", hd) < hd]


@pytest.mark.parametrize("save", [True, False], ids=["output_dir", "no_output_dir"])
def test_oneshot_model_runs_and_generates_after_value_pruning(model_dir, tmp_path, save):
    _need("llmcompressor")
    from llmcompressor import oneshot

    from fasp_ext.integrations.llmcompressor import FASPModifier

    toks = _windows(12, 32)
    model = _load(model_dir)
    mod = FASPModifier(sparsity=0.25, progress=False, options={"attn_sparsity": 0.25})  # default allocation
    oneshot(model=model, dataset=_dataset(toks), recipe=[mod], num_calibration_samples=12, max_seq_length=32,
            shuffle_calibration_samples=False, **({"output_dir": str(tmp_path / "out")} if save else {}))
    ref = _load(model_dir)
    rep = fasp_ext.prune(ref, toks, fasp_ext.PruneConfig(sparsity=0.25, attn_sparsity=0.25, progress=False))
    assert _value_pruned(rep, 16), "the reference pruned no value channel: the test would not test them"
    assert [b["v_head_dim"] for b in mod.report.blocks] == [b["v_head_dim"] for b in rep.blocks]

    x = _windows(2, 16, seed=9)
    with torch.no_grad():
        got = model(x).logits  # oneshot's save put the stock attention forward back on the modules
        want = ref(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        dense = _load(model_dir)(x).logits
    assert (dense - want).abs().max() > 1e-2  # the pruned function is not the dense one
    ids = x[:1, :8]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)
    assert torch.equal(gen, ref.generate(ids, max_new_tokens=4, do_sample=False))


def test_value_pruned_attention_survives_a_restored_stock_forward(model_dir):
    """The pruned attention is a property of the module's type: a toolkit that saved the stock forward
    before pruning and puts it back afterwards (compressed-tensors' remove_module_offload, accelerate's
    remove_hook_from_module) does not undo it; the module pickles, deep-copies and prints as the stock one."""
    import copy
    import io

    model = _load(model_dir)
    attns = [b.self_attn for b in model.model.layers]
    saved = [a.forward for a in attns]
    stock_repr = repr(model)
    rep = fasp_ext.prune(model, _windows(12, 32), fasp_ext.PruneConfig(sparsity=0.25, attn_sparsity=0.25,
                                                                       progress=False))
    assert _value_pruned(rep, 16)
    x = _windows(2, 16, seed=9)
    with torch.no_grad():
        want = model(x).logits
    for a, f in zip(attns, saved):
        a.forward = f
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=0)
    assert all(repr(a).startswith("LlamaAttention(\n") for a in attns) and "LlamaAttention(" in stock_repr
    stock = type(_load(model_dir).model.layers[0].self_attn)
    assert all(isinstance(a, stock) and type(a).__name__ == stock.__name__ for a in attns)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert type(twin.model.layers[0].self_attn) is type(attns[0])
        with torch.no_grad():
            torch.testing.assert_close(twin(x).logits, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- FASP + quantisation in one recipe

@pytest.fixture(scope="module")
def quant_model_dir(tmp_path_factory):
    """A tiny random LLaMA whose pruned widths can be W4A16's groups of 128 (pruning with mlp_multiple=128
    and attn_multiple=32 over 4 heads keeps every input width a multiple of 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
                      tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("tiny_q") / "model"
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


QUANT_FASP = {"sparsity": 0.3, "attn_sparsity": 0.3, "mlp_multiple": 128, "attn_multiple": 32}


def _quant_recipe(kind):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    from fasp_ext.integrations.llmcompressor import FASPModifier

    fasp = FASPModifier(sparsity=QUANT_FASP["sparsity"], progress=False,
                        options={k: v for k, v in QUANT_FASP.items() if k != "sparsity"})
    if kind == "gptq-w4a16":
        q = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    elif kind == "fp8-dynamic":
        q = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    else:  # int8 weights and per-token int8 activations, GPTQ
        q = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    return fasp, [fasp, q]


@pytest.mark.parametrize("kind", ["gptq-w4a16", "fp8-dynamic", "gptq-w8a8"])
def test_fasp_then_quantisation_reloads_to_the_in_memory_logits(quant_model_dir, tmp_path, kind):
    """FASP then a quantisation modifier in one recipe: every pruned projection is quantised, the folder
    oneshot writes (compressed-tensors' packed format on the pruned widths) reloads with load_pruned, and its
    logits equal the model's in memory exactly: both run the same dequantised weights (compressed-tensors'
    decompression of the same stored integers and scales) through the same compressed-tensors forward
    (measured difference 0.0 for all three schemes), so any difference is a loading defect."""
    _need("llmcompressor")
    from llmcompressor import oneshot
    from safetensors import safe_open

    toks = _windows(12, 32)
    model = _load(quant_model_dir)
    fasp, recipe = _quant_recipe(kind)
    out = tmp_path / "quantised"
    oneshot(model=model, dataset=_dataset(toks), recipe=recipe, num_calibration_samples=12, max_seq_length=32,
            shuffle_calibration_samples=False, output_dir=str(out))
    ref = _load(quant_model_dir)
    rep = fasp_ext.prune(ref, toks, fasp_ext.PruneConfig(progress=False, **QUANT_FASP))
    assert _value_pruned(rep, 64) and len({b["mlp_width"] for b in rep.blocks}) > 1  # per-block widths
    assert [(b["v_head_dim"], b["mlp_width"]) for b in fasp.report.blocks] == \
        [(b["v_head_dim"], b["mlp_width"]) for b in rep.blocks]

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fasp_ext"]["mlp_width"] == [b["mlp_width"] for b in rep.blocks]
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["ignore"] == ["lm_head"]  # pruned layers quantised
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    stored = "weight_packed" if kind == "gptq-w4a16" else "weight"
    for b in range(2):
        for lin in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
            assert f"model.layers.{b}.{lin}.{stored}" in names and f"model.layers.{b}.{lin}.weight_scale" in names

    x = _windows(2, 16, seed=9)
    with torch.no_grad():
        mem = model(x).logits  # the in-memory model: decompressed by compressed-tensors on this first forward
        unquantised = ref(x).logits
    assert (mem - unquantised).abs().max() > 1e-4  # quantisation changed the function
    back = fasp_ext.load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, mem, rtol=0, atol=0)
    ids = x[:1, :8]
    assert torch.equal(back.generate(ids, max_new_tokens=4, do_sample=False),
                       model.generate(ids, max_new_tokens=4, do_sample=False))

    # still strict: a tensor missing from the packed folder is an error naming it, before any weight is read
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(out / "model.safetensors"))
    gone = "model.layers.1.mlp.down_proj.weight_scale"
    del sd[gone]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing .*down_proj.weight_scale"):
        fasp_ext.load_pruned(broken)


def test_fasp_modifier_must_come_first_when_modifiers_follow(quant_model_dir):
    _need("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from fasp_ext.integrations.llmcompressor import FASPModifier

    toks = _windows(4, 16)
    recipe = [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]),
              FASPModifier(progress=False), QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    with pytest.raises(ValueError, match="put it first in the recipe"):
        oneshot(model=_load(quant_model_dir), dataset=_dataset(toks), recipe=recipe, num_calibration_samples=4,
                max_seq_length=16)


def test_group_size_is_checked_on_the_pruned_widths(quant_model_dir):
    """GPTQ W4A16 is initialised after FASP pruned: llm-compressor's own check that every quantised input
    width divides its groups of 128 runs on the pruned layers (MLP widths rounded to 8 by default), before
    any calibration, and names them."""
    _need("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from fasp_ext.integrations.llmcompressor import FASPModifier

    toks = _windows(12, 32)
    fasp = FASPModifier(sparsity=0.3, progress=False, options={"attn_sparsity": 0.3, "attn_multiple": 32})
    recipe = [fasp, GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])]
    with pytest.raises(ValueError, match=r"not divisible by group_size[\s\S]*mlp\.down_proj \(columns=(?!512)"):
        oneshot(model=_load(quant_model_dir), dataset=_dataset(toks), recipe=recipe, num_calibration_samples=12,
                max_seq_length=32, shuffle_calibration_samples=False)
    assert any(b["mlp_width"] % 128 for b in fasp.report.blocks)


def _quantised_config_folder(tmp_path, model_dir, qc):
    d = tmp_path / "q"
    d.mkdir()
    for f in model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_load_pruned_quantised_folder_errors(model_dir, tmp_path, monkeypatch):
    """Without compressed-tensors a compressed-tensors folder fails with one line saying what to install;
    another quantisation method is refused by name."""
    import importlib.util

    d = _quantised_config_folder(tmp_path, model_dir, {"quant_method": "compressed-tensors",
                                                       "format": "pack-quantized", "config_groups": {}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "compressed_tensors" else real(n, *a))
    with pytest.raises(UserError, match=r"^path: .*\(pack-quantized\).*pip install compressed-tensors$"):
        fasp_ext.load_pruned(d)
    monkeypatch.undo()
    (tmp_path / "b").mkdir()
    e = _quantised_config_folder(tmp_path / "b", model_dir, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(UserError, match="quantization method 'bitsandbytes'"):
        fasp_ext.load_pruned(e)


# ----------------------------------------------------------------------------- lm-eval

@pytest.fixture(scope="module")
def mc_task(tmp_path_factory):
    """A local multiple-choice task (JSONL + task YAML): no network needed."""
    d = tmp_path_factory.mktemp("task")
    g = torch.Generator().manual_seed(3)
    docs = []
    for i in range(8):
        ctx = " ".join(f"w{int(t)}" for t in torch.randint(0, WORDS, (5,), generator=g))
        choices = [" ".join(f"w{int(t)}" for t in torch.randint(0, WORDS, (1 + j % 3,), generator=g)) for j in range(4)]
        docs.append({"context": ctx, "choices": choices, "label": i % 4})
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    (d / "tiny_mc.yaml").write_text(
        "task: fasp_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {d / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return d / "tiny_mc.yaml", docs


@torch.no_grad()
def _direct_loglik(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), summed over the continuation's tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx
    logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _direct_acc(model, tok, docs) -> float:
    hits = 0
    for doc in docs:
        ll = [_direct_loglik(model, tok, doc["context"], " " + c) for c in doc["choices"]]
        hits += int(max(range(len(ll)), key=ll.__getitem__) == doc["label"])
    return hits / len(docs)


def test_lm_eval_loglikelihoods_match_direct_log_probs(mc_task):
    _need("lm_eval")
    from fasp_ext.integrations import lm_eval as lme

    task, docs = mc_task
    model, tok = tiny_llama(), _tokenizer()
    res = lme.evaluate(model, tok, [str(task)], log_samples=True, batch_size=3)
    samples = res["samples"]["fasp_tiny_mc"]
    assert len(samples) == len(docs)
    for s in samples:
        doc = s["doc"]
        got = [r[0][0] for r in s["resps"]]
        want = [_direct_loglik(model, tok, doc["context"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
    acc = lme.summary(res)["fasp_tiny_mc"]["acc"]
    assert acc == pytest.approx(_direct_acc(model, tok, docs))


def test_cli_eval_tasks_on_a_pruned_model(model_dir, mc_task, tmp_path):
    _need("lm_eval")
    task, docs = mc_task
    model = _load(model_dir)
    fasp_ext.prune(model, _windows(8, 32), fasp_ext.PruneConfig(sparsity=0.25, progress=False))
    out = tmp_path / "pruned"
    fasp_ext.save_pruned(model, out, _tokenizer())
    js = tmp_path / "eval.json"
    args = ["eval", "--model", str(out), "--tasks", str(task), "--json", str(js), "--quiet", "--device", "cpu"]
    assert main(args) == 0
    got = json.loads(js.read_text())["lm_eval"]["fasp_tiny_mc"]["acc"]
    assert got == pytest.approx(_direct_acc(fasp_ext.load_pruned(out), _tokenizer(), docs))


def test_cli_eval_tasks_errors(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(model_dir)]) == 2  # neither --data nor --tasks
    assert main(["eval", "--model", str(model_dir), "--tasks", str(tmp_path / "missing.yaml")]) == 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:  # without lm-eval: a clear error with the install command, before loading the model
        assert main(["eval", "--model", str(tmp_path / "no_model"), "--tasks", "piqa"]) == 2
        assert "pip install 'fasp_ext[lm-eval]'" in capsys.readouterr().err


def test_the_paper_tasks_are_known_to_lm_eval_by_name():
    _need("lm_eval")
    from lm_eval.tasks import TaskManager

    from fasp_ext.integrations.lm_eval import PAPER_TASKS, resolve_tasks

    assert set(PAPER_TASKS) <= set(TaskManager().all_tasks)  # names only: their data need the hub
    assert resolve_tasks(["paper", "lambada_openai"]) == ([*PAPER_TASKS, "lambada_openai"], [])
