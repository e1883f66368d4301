"""The main job end to end: calibrate -> export -> load in a fresh process -> generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import KVSurgeryError

_REPO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "kvdict.yaml"

# Runs in a fresh interpreter where `import kvsurgery` is refused: the checkpoint must
# load and decode with transformers and torch alone.
_CHILD = r"""
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kvsurgery" or name.startswith("kvsurgery."):
            raise ImportError("kvsurgery is blocked in this process")
sys.meta_path.insert(0, _Block())
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
folder, prompt, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
text_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True).get_text_config(decoder=True)
# SDPA cannot cap attention logits (Gemma2): the dense reference is then eager attention
dense = "eager" if getattr(text_cfg, "attn_logit_softcapping", None) else "sdpa"
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(prompt, return_tensors="pt")
out = {}
for name, kw in (("compressed", {}), ("dense", {"attn_implementation": dense})):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw)
    gen = model.generate(**ids, max_new_tokens=n_new, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    cache = gen.past_key_values
    seq = gen.sequences[0, ids["input_ids"].shape[1]:]
    nbytes = cache.nbytes() if hasattr(cache, "nbytes") else sum(
        l.keys.untyped_storage().nbytes() + l.values.untyped_storage().nbytes() for l in cache.layers)
    out[name] = {"tokens": seq.tolist(), "text": tok.decode(seq, skip_special_tokens=True),
                 "cache_type": type(cache).__name__, "cache_bytes": nbytes,
                 "cached_tokens": cache.get_seq_length()}
    cfg = model.config.get_text_config(decoder=True)
    out["fp16_bytes_per_token"] = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    out["dtype"] = str(model.dtype).replace("torch.", "")
print("RESULT" + json.dumps(out))
"""


def run_fresh_process(folder: str | Path, prompt: str, max_new_tokens: int) -> dict:
    """Load ``folder`` with ``trust_remote_code`` in a new interpreter (kvsurgery blocked)
    and generate greedily, compressed and dense. Returns the child's JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), prompt, str(max_new_tokens)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(Path(folder).resolve().parent),
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        raise KVSurgeryError(f"loading {folder} in a fresh process failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT") :])


def demo_prompt(tokenizer, n_tokens: int = 700) -> str:
    """A prompt of about ``n_tokens`` built-in tokens (beyond the exact buffer, so decoding
    reads compressed tokens)."""
    from .data import builtin_documents

    ids: list[int] = []
    for doc in builtin_documents("reverse"):
        ids += tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            break
    return tokenizer.decode(ids[:n_tokens]) + "\n\nIn summary, this section explains"


def generate_text(model: str, prompt: str, max_new_tokens: int) -> dict:
    res = run_fresh_process(model, prompt, max_new_tokens)
    return summarize(res)


def summarize(res: dict) -> dict:
    c, d = res["compressed"], res["dense"]
    same = sum(a == b for a, b in zip(c["tokens"], d["tokens"], strict=False))
    n = max(len(d["tokens"]), 1)
    bpt_c = c["cache_bytes"] / max(c["cached_tokens"], 1)
    bpt_d = d["cache_bytes"] / max(d["cached_tokens"], 1)
    return {
        "compressed_text": c["text"],
        "dense_text": d["text"],
        "greedy_tokens_equal_to_dense": f"{same}/{n}",
        "cache": c["cache_type"],
        "cached_tokens": c["cached_tokens"],
        "kv_bytes_per_token_compressed": round(bpt_c, 1),
        "kv_bytes_per_token_fp16": res["fp16_bytes_per_token"],
        "kv_memory_vs_fp16": f"{bpt_c / res['fp16_bytes_per_token']:.1%}",
        # the exact sinks and buffer are stored in the model's dtype: in fp32 they cost
        # twice what the fp16 figure assumes, the codes do not
        "model_dtype": res.get("dtype"),
        "kv_memory_vs_dense_cache_same_run": f"{bpt_c / max(bpt_d, 1e-9):.1%}",
    }


def run_demo(
    model: str | None,
    out: str | Path,
    *,
    recipe: str | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
) -> dict:
    """Calibrate, export, load in a fresh process and generate; ``samples``/``seq_len``
    default to the recipe's ``calibration:`` block."""
    from .calibrate import calibrate
    from .export import export
    from .models import load_model
    from .recipes import default_recipe, load_recipe, resolve_calibration

    out = Path(out)
    if recipe is None and _REPO_RECIPE.is_file():
        recipe = str(_REPO_RECIPE)
    r = load_recipe(recipe) if recipe else default_recipe("kvdict")
    loaded = load_model(model)
    settings = resolve_calibration([r], {"samples": samples, "seq_len": seq_len})
    calibrate(model, out / "calibration", recipes=[r], settings=settings, loaded=loaded)
    path = export(out / "calibration", out / "export", loaded=loaded, overwrite=True)
    # as long as the context the recipe's memory target is stated for, so the printed
    # bytes per token are comparable with it
    prompt = demo_prompt(loaded[1], max(700, int(getattr(r.config, "target_context", 0)) - 64))
    summary = summarize(run_fresh_process(path, prompt, 40))
    summary["export"] = str(path)
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
