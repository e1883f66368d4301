"""Shared fixtures: tiny random models of several architectures, saved as local folders
with a small word-level tokenizer, and the real SmolLM2-135M (converted once, cached)."""

from __future__ import annotations

import collections
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 384


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kvsurgery.data import builtin_documents

    words = collections.Counter(re.findall(r"\w+|[^\w\s]", " ".join(builtin_documents()[:20])))
    vocab = {"[UNK]": 0, "[EOS]": 1, "[PAD]": 2}
    for w, _ in words.most_common(VOCAB - len(vocab)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]"
    )


def tiny_config(arch: str):
    """Tiny random configs: 2–3 layers, head_dim 16 (Gemma: 32), GQA where the family has it."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=1,
        pad_token_id=2,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_hidden_layers=2, sliding_window=None, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=2, head_dim=16, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(
            num_hidden_layers=3,
            head_dim=32,
            sliding_window=16,
            **{**common, "num_key_value_heads": 1},
        )
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            num_hidden_layers=3,
            head_dim=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **{**common, "num_key_value_heads": 1},
        )
    raise ValueError(arch)


def make_tiny(arch: str, folder, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> folder of a saved tiny random model (built lazily, once per session)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = make_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dirs):
    return tiny_dirs("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct), loaded once for the session."""
    from kvsurgery.models import load_model

    return load_model("smollm2-135m")
