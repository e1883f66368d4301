"""Shared fixtures: tiny random models of several architectures, saved as local folders
with a small word-level tokenizer, and the real SmolLM2-135M (converted once, cached)."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

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


# -- compiled Triton kernels on a GPU ----------------------------------------------------
# The kernel tests build CPU tensors and, in CI, run the kernels under TRITON_INTERPRET=1.
# On a machine with CUDA (and TRITON_INTERPRET unset) `on_device` runs the same calls on the
# GPU: tensors go over (views keep their strides), results come back, and tensors the call
# changed in place (cache state) are copied back, so each test checks the compiled kernel
# against its CPU reference unchanged.


def _to_device(x: torch.Tensor, dev) -> torch.Tensor:
    base = x._base if x._base is not None else x
    if x is base or not base.is_contiguous() or base.storage_offset() != 0:
        return x.to(dev)
    g = base.to(dev)
    return g.as_strided(x.size(), x.stride(), x.storage_offset())


def on_device(fn, dev):
    """``fn`` with its CPU tensor arguments (also inside dicts, lists, tuples) on ``dev``."""

    def call(*args, **kwargs):
        moved = {}

        def there(x):
            if isinstance(x, torch.Tensor) and x.device.type == "cpu":
                if id(x) not in moved:
                    moved[id(x)] = (x, _to_device(x, dev))
                return moved[id(x)][1]
            if isinstance(x, dict):
                return {k: there(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(there(v) for v in x)
            return x

        def back(x):
            if isinstance(x, torch.Tensor):
                return x.cpu()
            if isinstance(x, (list, tuple)):
                return type(x)(back(v) for v in x)
            return x

        out = fn(*there(args), **there(kwargs))
        for orig, moved_x in moved.values():
            now = moved_x.cpu()
            if not torch.equal(orig, now):  # written in place by the kernel
                orig.copy_(now)
        return back(out)

    call.__wrapped__ = fn
    return call


@pytest.fixture
def kernels_on_gpu(monkeypatch):
    """``kernels_on_gpu(module, names)``: route those Triton entry points through
    :func:`on_device` for this test (a no-op unless called)."""

    def patch(module, names):
        for name in names:
            monkeypatch.setattr(module, name, on_device(getattr(module, name), "cuda"))

    return patch


# -- compiling Triton kernels for sm_90 without a GPU -----------------------------------
# The interpreter runs kernels as Python and skips Triton's compiler passes; each kernel
# module's test compiles its kernels for the H100 in a fresh process (triton must not be
# in interpreter mode there) so frontend/codegen errors show up in CI, not on the GPU.
SM90_PRELUDE = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton.backends.nvidia  # noqa: F401
except Exception as e:  # API moved or no CUDA backend: nothing to check
    print("SKIP", repr(e)); sys.exit(0)

def build(fn, ptrs, consts, floats=(), aligned_strides=True):
    # ptrs: pointer types by name; floats: fp32 scalars; other arguments i32. Pointers (and
    # with aligned_strides the stride_*b / stride_*h arguments) are marked 16-byte aligned,
    # as the launcher specialises them at run time.
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        sig[n] = "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32")
        stride = aligned_strides and n.startswith("stride_") and n[-1] in "bh"
        if sig[n].startswith("*") or stride:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
"""


@pytest.fixture
def compile_for_sm90():
    """``compile_for_sm90(body, **env)``: run :data:`SM90_PRELUDE` + ``body`` in a fresh
    process (``env`` added to the environment); it must print OK, or SKIP to skip."""

    def run(body: str, **env):
        env = {**os.environ, **env}
        env.pop("TRITON_INTERPRET", None)
        r = subprocess.run(
            [sys.executable, "-c", SM90_PRELUDE + body],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        if r.stdout.startswith("SKIP"):
            pytest.skip(r.stdout.strip())
        assert "OK" in r.stdout

    return run
