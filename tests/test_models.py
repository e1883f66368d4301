"""Model loading: every source kind, supported architectures, and the error messages."""

import pytest
import torch

from kvsurgery.errors import KVSurgeryError
from kvsurgery.models import classify_source, load_model, model_dims


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_load_supported_architectures(tiny_dirs, arch):
    model, tok, info = load_model(tiny_dirs(arch))
    assert info.kind == "folder" and info.model_type == model.config.model_type
    dims = model_dims(model.config)
    assert dims["num_layers"] == model.config.num_hidden_layers
    if arch.startswith("gemma"):
        assert "sliding_attention" in dims["layer_types"] and dims["num_kv_heads"] == 1


def test_dtype_and_revision_hash(tiny_llama_dir):
    m1, _, i1 = load_model(tiny_llama_dir, dtype="bf16")
    assert next(m1.parameters()).dtype == torch.bfloat16
    _, _, i2 = load_model(tiny_llama_dir)
    assert i1.revision == i2.revision


def test_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(KVSurgeryError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(KVSurgeryError, match=r"GGUF file .* does not exist"):
        load_model(str(tmp_path / "x.gguf"))
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(KVSurgeryError, match="is a file but not a .gguf"):
        load_model(str(tmp_path / "w.bin"))
    with pytest.raises(KVSurgeryError, match="neither an existing folder"):
        classify_source("not a model")
    with pytest.raises(KVSurgeryError, match="unknown dtype 'fp12'"):
        load_model(tiny_llama_dir, dtype="fp12")
    assert classify_source("org/name") == "hub" and classify_source("SmolLM2-135M") == "alias"


def test_encoder_only_model_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(KVSurgeryError, match="encoder-only: its attention is bidirectional"):
        load_model(str(tmp_path))


def test_model_without_cache_api_refused(tiny_llama_dir, monkeypatch):
    """A model whose attention never calls past_key_values.update() cannot be compressed."""
    from kvsurgery import models

    model, _, _ = load_model(tiny_llama_dir)
    for layer in model.model.layers:
        attn = layer.self_attn
        orig = attn.forward

        def forward(*a, _orig=orig, **kw):
            kw["past_key_values"] = None
            return _orig(*a, **kw)

        attn.forward = forward
    with pytest.raises(
        KVSurgeryError, match=r"layers \[0, 1\] never called past_key_values.update\(\)"
    ):
        models.check_supported(model)


def test_hub_id_goes_through_from_pretrained_offline():
    with pytest.raises(Exception, match="(?i)offline|connect|couldn't|not found|cannot find"):
        load_model("someone/definitely-not-here-kvs")


def test_default_model_alias_is_smollm2(smollm2):
    model, tok, info = smollm2
    assert info.kind == "alias" and info.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()


def test_gguf_file_loads_dequantized_and_exportable(smollm2, tmp_path):
    """The .gguf route: dequantized weights equal the converted default model's."""
    from kvsurgery.models import cache_dir

    gguf = next((cache_dir() / "models").rglob("*.gguf"))
    model, tok, info = load_model(str(gguf))
    assert info.kind == "gguf" and info.revision.startswith("sha256:")
    assert getattr(model, "hf_quantizer", None) is None
    ref = smollm2[0]
    torch.testing.assert_close(
        model.model.layers[3].self_attn.k_proj.weight, ref.model.layers[3].self_attn.k_proj.weight
    )
    model.save_pretrained(tmp_path)  # refused while the GGUF quantizer is attached
    assert (tmp_path / "model.safetensors").is_file()
