"""`kvsurgery eval`: quality and memory of every method and baseline, measured the same way.

Every (method, task, context) *cell* runs one model with one fresh cache per sequence:

- ``ppl``: continuation perplexity. ``context`` tokens of real text (the built-in corpus
  read back to front, far from what calibration reads first) are prefilled through the
  cache; then the next 128 tokens are fed one at a time through it (teacher forcing) and
  each next token is scored: ``exp(mean NLL)`` over those 128 predictions, every one of
  which reads the prefix from the cache's stored (possibly compressed) state. With
  ``ppl_texts`` > 1 that is repeated on as many consecutive, disjoint windows of the corpus
  (a fresh cache each) and the NLL averaged over all their predictions: one 128-token
  continuation is a small sample, on which methods can swap places.
- ``passkey`` / ``needle``: a prompt of ``context`` tokens with a fact at several depths;
  the text is prefilled, then the question is fed as a second step through the cache and a
  few tokens are decoded greedily; accuracy over depths (and trials).
- ``hub:<dataset>[:config[:split]]``: LongBench-style QA on a Hub dataset (question,
  context and answer columns named by the user), the document cut to the context length
  (middle truncation), greedy answer, SQuAD-style EM and F1.

Memory is the bytes the cache has actually allocated after prefill and decode (storage
sizes, not formulas), per token held, and as a share of an fp16 full cache holding as many
tokens. Results go to ``out_dir``: ``cells.jsonl`` (one finished cell per line; a rerun
skips them), ``results.json`` (every number with its settings, versions and seed) and
``results.md`` (the table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from . import __version__
from .baselines import (
    QUANT_BACKENDS,
    cache_nbytes,
    full,
    quantized,
    quantized_unavailable,
    sink_window,
)
from .errors import KVSurgeryError

DEFAULT_CONTEXTS = (2048, 4096, 8192)
DEFAULT_TASKS = ("ppl", "passkey", "needle")
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
RESULTS_VERSION = 1
CELLS = "cells.jsonl"
_METHOD_HELP = (
    "full, a compressed method (kvdict, clusterkv, subgen, ...), sink_window (one per "
    "compressed method, memory matched to it), sink_window@METHOD, sink_window:W (W recent "
    "tokens), quantized-int4 / quantized-int2 (backend quanto, else hqq), "
    "quantized-int4-hqq / quantized-int2-quanto (backend fixed)"
)


def _compressed_methods() -> tuple[str, ...]:
    from .recipes import METHODS

    return tuple(METHODS)


_TASK_HELP = "ppl, passkey, needle, hub:<dataset>[:config[:split]]"


# -- specs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """A method or baseline as named on the command line."""

    name: str
    kind: str  # full | kvdict | sink_window | quantized
    window: int | None = None  # sink_window: None = match a compressed method's memory
    matched_to: str | None = None  # sink_window: the compressed method whose memory it matches
    nbits: int | None = None
    backend: str | None = None  # quantized: None = first available

    @property
    def compressed(self) -> bool:
        return self.kind in _compressed_methods()


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # ppl | passkey | needle | hub
    dataset: str | None = None
    config: str | None = None
    split: str = "test"


def parse_method(spec: str) -> MethodSpec:
    s = spec.strip()
    if s == "full" or s in _compressed_methods():
        return MethodSpec(s, s)
    m = re.fullmatch(r"sink_window(?::(\d+)|@(\w+))?", s)
    if m:
        w = int(m.group(1)) if m.group(1) else None
        if w is not None and w < 1:
            raise KVSurgeryError(f"method {s!r}: the window must be at least 1 token.")
        if m.group(2) and m.group(2) not in _compressed_methods():
            raise KVSurgeryError(
                f"method {s!r}: {m.group(2)!r} is not a compressed method "
                f"({', '.join(_compressed_methods())})."
            )
        return MethodSpec(s, "sink_window", window=w, matched_to=m.group(2))
    m = re.fullmatch(r"quantized-int(\d+)(?:-(\w+))?", s)
    if m:
        nbits, backend = int(m.group(1)), m.group(2)
        if nbits not in (2, 4):
            raise KVSurgeryError(f"method {s!r}: quantized baselines are int2 or int4.")
        if backend is not None and backend not in QUANT_BACKENDS:
            raise KVSurgeryError(
                f"method {s!r}: unknown backend {backend!r}; use {', '.join(QUANT_BACKENDS)}."
            )
        return MethodSpec(s, "quantized", nbits=nbits, backend=backend)
    raise KVSurgeryError(f"unknown method {s!r}; known methods: {_METHOD_HELP}.")


def parse_task(spec: str) -> TaskSpec:
    s = spec.strip()
    if s in ("ppl", "passkey", "needle"):
        return TaskSpec(s, s)
    if s.startswith("hub:"):
        parts = s[4:].split(":")
        if not parts[0] or len(parts) > 3:
            raise KVSurgeryError(
                f"task {s!r}: write a Hub task as hub:<dataset>[:config[:split]], "
                "e.g. hub:org/longbench-qa::test."
            )
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "test"
        return TaskSpec(s, "hub", parts[0], config, split)
    raise KVSurgeryError(f"unknown task {s!r}; known tasks: {_TASK_HELP}.")


def parse_contexts(text: str | int | list | tuple) -> list[int]:
    """``"2k,4k,8k"`` -> ``[2048, 4096, 8192]`` (``k`` = 1024); plain integers are tokens."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out = []
    for item in items:
        s = str(item).strip().lower()
        m = re.fullmatch(r"(\d+)(k?)", s)
        if not m or int(m.group(1)) <= 0:
            raise KVSurgeryError(
                f"bad context {str(item).strip()!r}: give token counts as positive integers or "
                "with a k suffix (k = 1024), comma-separated, e.g. 2k,4k,8k or 512,1024."
            )
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise KVSurgeryError("no context length given; e.g. --context 2k,4k,8k.")
    return out


def _split_list(value, parse) -> list:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [parse(x) for x in items if str(x).strip()]


def _unique(specs: list) -> list:
    first = {}
    for spec in specs:
        first.setdefault(spec.name, spec)
    return list(first.values())


@dataclass
class EvalConfig:
    """Everything but the model that decides the numbers (recorded in results.json)."""

    ppl_tokens: int = 128  # continuation tokens scored after the prefix
    ppl_texts: int = 1  # disjoint text windows the perplexity averages over
    depths: tuple = DEFAULT_DEPTHS
    trials: int = 1  # prompts per depth (passkey, needle)
    answer_tokens: int = 8  # greedy tokens decoded for passkey/needle
    # passkey/needle: the question ends the prefilled prompt (as with generate()) instead
    # of arriving after the context has been compressed
    question_in_prompt: bool = False
    n_sink: int = 4  # sink_window: exact first tokens
    quant_group: int = 64  # quantized: q_group_size
    quant_residual: int = 128  # quantized: dense residual window
    hub_question_col: str = "question"
    hub_context_col: str | None = "context"
    hub_answer_col: str = "answers"
    hub_limit: int = 50
    hub_max_new_tokens: int = 32
    hub_streaming: bool = True

    def __post_init__(self):
        self.depths = tuple(float(d) for d in self.depths)
        for k in (
            "ppl_tokens",
            "ppl_texts",
            "trials",
            "answer_tokens",
            "hub_limit",
            "hub_max_new_tokens",
        ):
            if getattr(self, k) < 1:
                raise KVSurgeryError(f"{k} must be >= 1, got {getattr(self, k)}.")
        if any(not 0 <= d <= 1 for d in self.depths) or not self.depths:
            raise KVSurgeryError(f"depths must be fractions in [0, 1], got {self.depths}.")
        if self.n_sink < 0:
            raise KVSurgeryError(f"n_sink must be >= 0, got {self.n_sink}.")


# -- loading ------------------------------------------------------------------------------
def _is_export(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and "kvsurgery" in json.loads(cfg.read_text())


def load_for_eval(source, *, calibration=None, dtype="auto", device_map=None):
    """``(model, tokenizer, info dict)`` from a source string (an exported kvsurgery folder
    loads with its remote code) or an already loaded ``(model, tokenizer[, ModelInfo])``.
    ``calibration`` only supplies the model when ``source`` is None."""
    if isinstance(source, (tuple, list)):
        model, tok = source[0], source[1]
        info = source[2] if len(source) > 2 and source[2] is not None else {}
        info = dict(info) if isinstance(info, dict) else info.to_dict()
    else:
        from .models import load_model, parse_dtype

        if source is None and calibration is not None:
            from .calibrate import read_manifest

            source = read_manifest(calibration)["model"]["source"]
        path = Path(str(source)).expanduser() if source else None
        if path is not None and path.is_dir() and _is_export(path):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            kw = {"dtype": parse_dtype(dtype), "trust_remote_code": True}
            if device_map is not None:
                kw["device_map"] = device_map
            model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
            tok = AutoTokenizer.from_pretrained(path)
            info = {"source": str(source), "kind": "export", "path": str(path.resolve())}
            info["model_type"] = model.config.model_type
        else:
            model, tok, mi = load_model(source, dtype=dtype, device_map=device_map)
            info = mi.to_dict()
    if calibration is not None and getattr(model, "_kvsurgery_state", None) is not None:
        raise KVSurgeryError(
            "the model already carries a compressed state (an exported checkpoint); evaluate "
            "it without --calibration, or pass the base model with --calibration."
        )
    model.eval()
    return model, tok, info


def _calibration_record(calibration) -> dict | None:
    if calibration is None:
        return None
    from .calibrate import read_manifest

    man = read_manifest(calibration)
    return {
        "path": str(Path(calibration).resolve()),
        "created": man.get("created"),
        "data": man.get("data"),
        "methods": {
            k: {"recipe_hash": v.get("recipe_hash"), "code_bytes_ratio": v.get("code_bytes_ratio")}
            for k, v in man.get("methods", {}).items()
        },
    }


def _state_block(model) -> dict | None:
    state = getattr(model, "_kvsurgery_state", None)
    if state is None:
        return None
    return {k: v for k, v in state.items() if k != "modules"}


# -- model plumbing -----------------------------------------------------------------------
def _device(model):
    return next(model.parameters()).device


def _forward(model, ids: torch.Tensor, cache, last_only: bool = True):
    kw = {"logits_to_keep": 1} if last_only else {}
    return model(input_ids=ids, past_key_values=cache, use_cache=True, **kw).logits


def _register_compressed(model) -> None:
    """Make ``"kvsurgery"`` point at the attention function of the runtime that built this
    model's cache layers (an exported checkpoint brings its own copy of the runtime)."""
    name = type(model).__module__.rpartition(".")[0] + ".kvs_attention"
    mod = sys.modules.get(name)
    if mod is None or not hasattr(mod, "register"):
        from .runtime import kvs_attention as mod
    mod.register()


class _Attention:
    """Context manager: the compressed attention for compressed methods, dense otherwise."""

    def __init__(self, model, compressed: bool):
        self.model, self.compressed = model, compressed

    def __enter__(self):
        self.before = self.model.config._attn_implementation
        if self.compressed:
            _register_compressed(self.model)
            self.model.set_attn_implementation("kvsurgery")
        elif self.before == "kvsurgery":
            cfg = self.model.config.get_text_config(decoder=True)
            # SDPA cannot cap attention logits (Gemma2): eager attention there
            dense = "eager" if getattr(cfg, "attn_logit_softcapping", None) else "sdpa"
            self.model.set_attn_implementation(dense)

    def __exit__(self, *exc):
        if self.model.config._attn_implementation != self.before:
            self.model.set_attn_implementation(self.before)


def compressed_cache(model):
    """A fresh compressed cache for a model carrying KV-Dict state (in-process or exported)."""
    if hasattr(model, "kvsurgery_cache"):
        return model.kvsurgery_cache()
    from .runtime.kvs_methods import build_cache

    return build_cache(model)


def compressed_tokens(cache) -> int:
    """Tokens held as codes (0 for caches without a compressed part)."""
    return max((int(getattr(layer, "n_comp", 0)) for layer in cache.layers), default=0)


def _dims(model) -> dict:
    from .models import model_dims

    return model_dims(model.config)


def fp16_full_bytes(dims: dict, n_tokens: int) -> int:
    """Bytes an fp16 full cache (DynamicCache) would hold for ``n_tokens`` tokens."""
    per = 2 * dims["num_kv_heads"] * dims["head_dim"] * 2
    total = 0
    for lt in dims["layer_types"]:
        held = n_tokens
        if lt == "sliding_attention" and dims.get("sliding_window"):
            held = min(n_tokens, dims["sliding_window"] - 1)
        total += per * held
    return total


# -- measurements -------------------------------------------------------------------------
@torch.no_grad()
def continuation_nll(model, ids: torch.Tensor, context: int, n_tokens: int, cache) -> list[float]:
    """Prefill ``ids[:context]`` into ``cache``, then feed ``ids[context + t]`` one token at a
    time and return the NLL of each next token ``ids[context + t + 1]``, ``t < n_tokens``."""
    if ids.numel() < context + n_tokens + 1:
        raise KVSurgeryError(f"need {context + n_tokens + 1} tokens of text, got {ids.numel()}.")
    ids = ids.to(_device(model)).view(1, -1)
    _forward(model, ids[:, :context], cache)
    nll = []
    for t in range(context, context + n_tokens):
        logits = _forward(model, ids[:, t : t + 1], cache)[0, -1].float()
        nll.append(float(-torch.log_softmax(logits, -1)[ids[0, t + 1]]))
    return nll


@torch.no_grad()
def greedy_answer(model, cache, context_ids, question_ids, max_new: int, eos=()) -> list[int]:
    """Prefill the context, feed the question as one step through the cache, decode greedily."""
    dev = _device(model)
    if len(context_ids):
        _forward(model, torch.tensor([list(context_ids)], device=dev), cache)
    logits = _forward(model, torch.tensor([list(question_ids)], device=dev), cache)[0, -1]
    out: list[int] = []
    while True:
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in eos or len(out) >= max_new:
            return out
        logits = _forward(model, torch.tensor([[nxt]], device=dev), cache)[0, -1]


def _eos_ids(model, tok) -> set:
    ids = set()
    for v in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


# -- the run ------------------------------------------------------------------------------
@dataclass
class _Run:
    model: object
    tok: object
    info: dict
    cfg: EvalConfig
    seed: int
    dims: dict
    base_fp: str
    text_ids: torch.Tensor | None = None
    haystack: list | None = None
    hub_rows: dict = field(default_factory=dict)

    # data ------------------------------------------------------------------------------
    def text(self, n: int) -> torch.Tensor:
        if self.text_ids is None or self.text_ids.numel() < n:
            from .data import builtin_documents, pack_tokens

            self.text_ids = pack_tokens(builtin_documents("reverse"), self.tok, 1, n)[0]
        return self.text_ids[:n]

    def sentences(self) -> list:
        if self.haystack is None:
            from .data import builtin_documents
            from .tasks import text_sentences

            self.haystack = text_sentences(builtin_documents("reverse"))
        return self.haystack

    def rows(self, task: TaskSpec) -> list[dict]:
        if task.name not in self.hub_rows:
            self.hub_rows[task.name] = _load_hub_rows(task, self.cfg)
        return self.hub_rows[task.name]

    # cells -----------------------------------------------------------------------------
    def run_cell(self, method: MethodSpec, builder, task: TaskSpec, context: int) -> dict:
        t0 = time.perf_counter()
        with _Attention(self.model, method.compressed):
            if task.kind == "ppl":
                metrics, cache = self._ppl(builder, context)
            elif task.kind in ("passkey", "needle"):
                metrics, cache = self._retrieval(builder, task.kind, context)
            else:
                metrics, cache = self._hub(builder, task, context)
        n_tok = int(cache.get_seq_length())
        nbytes = int(cache_nbytes(cache))
        cell = {
            "metrics": metrics,
            "kv_bytes": nbytes,
            "kv_tokens": n_tok,
            "kv_bytes_per_token": nbytes / max(n_tok, 1),
            "fp16_full_bytes": fp16_full_bytes(self.dims, n_tok),
            "kv_ratio_fp16": nbytes / max(fp16_full_bytes(self.dims, n_tok), 1),
            "cache": type(cache).__name__,
            "compressed_tokens": compressed_tokens(cache),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        warnings = []
        if method.compressed and cell["compressed_tokens"] == 0:
            warnings.append("nothing was compressed: the context fits in the exact sinks+buffer")
        limit = self.dims.get("max_position_embeddings")
        if limit and n_tok > limit:
            warnings.append(f"positions reach {n_tok}, beyond max_position_embeddings={limit}")
        if warnings:
            cell["warnings"] = warnings
        return cell

    def _ppl(self, builder, context):
        n, texts = self.cfg.ppl_tokens, self.cfg.ppl_texts
        length = context + n + 1
        windows = self.text(length * texts).view(texts, length)  # consecutive, disjoint
        nll, per_text = [], []
        for ids in windows:
            cache = builder(self.model)
            part = continuation_nll(self.model, ids, context, n, cache)
            per_text.append(math.exp(sum(part) / n))
            nll += part
        mean = sum(nll) / len(nll)
        metrics = {"perplexity": math.exp(mean), "nll": mean, "tokens_scored": len(nll)}
        if texts > 1:
            metrics["perplexity_per_text"] = per_text
        return metrics, cache  # memory is measured on the last text's cache

    def _retrieval(self, builder, kind, context):
        from .tasks import needle_prompt, needle_score, passkey_prompt, passkey_score

        eos = _eos_ids(self.model, self.tok)
        examples, cache = [], None
        for trial in range(self.cfg.trials):
            for i, depth in enumerate(self.cfg.depths):
                ex_seed = self.seed * 10007 + trial * 101 + i
                try:
                    if kind == "passkey":
                        p = passkey_prompt(self.tok, context, depth, seed=ex_seed)
                    else:
                        p = needle_prompt(
                            self.tok, context, depth, seed=ex_seed, haystack=self.sentences()
                        )
                except ValueError as e:
                    raise KVSurgeryError(f"{kind} at context {context}: {e}") from e
                ctx_ids = self.tok(p.context)["input_ids"]
                q_ids = self.tok(p.question, add_special_tokens=False)["input_ids"]
                if self.cfg.question_in_prompt:  # one prefill; its last token starts decoding
                    ctx_ids, q_ids = ctx_ids + q_ids[:-1], q_ids[-1:]
                cache = builder(self.model)
                out = greedy_answer(self.model, cache, ctx_ids, q_ids, self.cfg.answer_tokens, eos)
                pred = self.tok.decode(out, skip_special_tokens=True)
                score = (passkey_score if kind == "passkey" else needle_score)(pred, p.answer)
                examples.append({**p.to_dict(), "prediction": pred, "score": score})
        by_depth = {}
        for d in self.cfg.depths:
            s = [e["score"] for e in examples if e["depth"] == d]
            by_depth[str(d)] = sum(s) / len(s)
        acc = sum(e["score"] for e in examples) / len(examples)
        return {"accuracy": acc, "by_depth": by_depth, "examples": examples}, cache

    def _hub(self, builder, task, context):
        from .tasks import exact_match, f1_score, first_line, qa_prompt, truncate_middle

        cfg, eos = self.cfg, _eos_ids(self.model, self.tok)
        examples, cache = [], None
        for i, row in enumerate(self.rows(task)):
            ctx_text, q_text = qa_prompt(row["context"], row["question"])
            q_ids = self.tok(q_text, add_special_tokens=not ctx_text)["input_ids"]
            room = context - len(q_ids) - cfg.hub_max_new_tokens
            if room < 1:
                raise KVSurgeryError(
                    f"{task.name}: example {i}'s question takes {len(q_ids)} tokens, which with "
                    f"{cfg.hub_max_new_tokens} answer tokens leaves no room in a context of "
                    f"{context}; use a longer context or fewer --hub-max-new-tokens."
                )
            ctx_ids = truncate_middle(self.tok(ctx_text)["input_ids"], room) if ctx_text else []
            cache = builder(self.model)
            out = greedy_answer(self.model, cache, ctx_ids, q_ids, cfg.hub_max_new_tokens, eos)
            pred = first_line(self.tok.decode(out, skip_special_tokens=True))
            examples.append(
                {
                    "index": i,
                    "prompt_tokens": len(ctx_ids) + len(q_ids),
                    "prediction": pred,
                    "answers": row["answers"],
                    "em": exact_match(pred, row["answers"]),
                    "f1": f1_score(pred, row["answers"]),
                }
            )
        n = len(examples)
        return {
            "em": sum(e["em"] for e in examples) / n,
            "f1": sum(e["f1"] for e in examples) / n,
            "n": n,
            "examples": examples,
        }, cache


def _load_hub_rows(task: TaskSpec, cfg: EvalConfig) -> list[dict]:
    import datasets

    from .tasks import answers_of

    try:
        ds = datasets.load_dataset(
            task.dataset, task.config, split=task.split, streaming=cfg.hub_streaming
        )
    except Exception as e:  # the Hub client raises many types; all mean "cannot read it"
        raise KVSurgeryError(
            f"could not load Hub dataset {task.dataset!r} (config={task.config!r}, "
            f"split={task.split!r}) for task {task.name!r}: {type(e).__name__}: "
            f"{str(e)[:300]}. Check the name, config, split and network access."
        ) from e
    cols = {
        "question": cfg.hub_question_col,
        "context": cfg.hub_context_col,
        "answers": cfg.hub_answer_col,
    }
    rows = []
    for row in ds:
        missing = [c for c in cols.values() if c and c not in row]
        if missing:
            raise KVSurgeryError(
                f"Hub dataset {task.dataset!r} has no column {missing[0]!r} (columns: "
                f"{sorted(row)}); choose the columns with --hub-question-col, "
                "--hub-context-col and --hub-answer-col."
            )
        answers = answers_of(row[cols["answers"]])
        if not answers:
            continue
        rows.append(
            {
                "question": str(row[cols["question"]]),
                "context": str(row[cols["context"]]) if cols["context"] else "",
                "answers": answers,
            }
        )
        if len(rows) >= cfg.hub_limit:
            break
    if not rows:
        raise KVSurgeryError(f"Hub dataset {task.dataset!r} gave no example with an answer.")
    return rows


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_fingerprint(model, info: dict) -> str:
    if info.get("revision"):
        return str(info["revision"])
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in list(model.named_parameters())[:4]:
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return "params:" + h.hexdigest()[:16]


def _read_cells(path: Path) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                cell = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interruption: that cell reruns
            done[(cell.get("id"), cell.get("fingerprint"))] = cell
    return done


def _append_cell(path: Path, cell: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(cell) + "\n")
        f.flush()


def _calibrated_methods(calibration) -> list[str]:
    if calibration is None:
        return []
    from .calibrate import read_manifest

    return list(read_manifest(calibration).get("methods", {}))


def _training_free(method: str) -> bool:
    from .calibrate import CALIBRATORS, method_module

    return method in CALIBRATORS and hasattr(method_module(method), "default_entry")


def default_methods(model, calibration=None) -> list[str]:
    """Every compressed method the model can run (the one an exported checkpoint carries,
    those the calibration has, the training-free ones), then the baselines."""
    block = _state_block(model)
    methods = [block["method"]] if block is not None else []
    methods += _calibrated_methods(calibration)
    methods += [m for m in _compressed_methods() if _training_free(m)]
    methods = list(dict.fromkeys(methods))
    baselines = ["full"] + (["sink_window"] if methods else [])
    # Quantized baselines are skipped, with the reason, where their backend is missing.
    return methods + baselines + ["quantized-int4", "quantized-int2"]


def _install_states(model, calibration, specs: list) -> dict[str, dict]:
    """Install each compressed method's state on the model, in turn, and keep it: from an
    exported checkpoint (its own method), the calibration folder, or training-free defaults.
    Returns ``{method: state}``; ``model._kvsurgery_state`` is swapped per method."""
    from .export import apply_default, apply_to_model

    exported = getattr(model, "_kvsurgery_state", None)
    calibrated = _calibrated_methods(calibration)
    states = {}
    for m in specs:
        if not m.compressed or m.kind in states:
            continue
        if exported is not None and exported.get("method") == m.kind:
            states[m.kind] = exported
            continue
        if m.kind in calibrated:
            apply_to_model(model, calibration, m.kind)
        elif _training_free(m.kind):
            apply_default(model, m.kind)
        else:
            raise KVSurgeryError(
                f"method {m.name!r} needs a model that carries its state: pass --calibration "
                f"with a {m.kind} calibration, or --model with an exported {m.kind} checkpoint."
            )
        states[m.kind] = model._kvsurgery_state
    return states


def _state_fingerprint(state: dict) -> str:
    # `exported_with` holds the time the block was built: not a setting.
    skip = ("modules", "exported_with")
    return _fingerprint({k: v for k, v in state.items() if k not in skip})


def _window_for(run: _Run, target_bytes: float, n_tokens: int) -> int:
    """The sink_window window whose cache holds about ``target_bytes`` at ``n_tokens``."""
    es = torch.finfo(run.model.dtype).bits // 8
    per = 2 * run.dims["num_kv_heads"] * run.dims["head_dim"] * es
    sw = run.dims.get("sliding_window")
    full_layers, sliding_bytes = 0, 0
    for lt in run.dims["layer_types"]:
        if lt == "sliding_attention" and sw:
            sliding_bytes += per * min(n_tokens, sw - 1)
        else:
            full_layers += 1
    w = int((target_bytes - sliding_bytes) // (per * max(full_layers, 1))) - run.cfg.n_sink
    return max(1, w)


def _task_settings(cfg: EvalConfig, kind: str) -> dict:
    """The settings a task's numbers depend on (a change reruns only those cells)."""
    names = {
        "ppl": ("ppl_tokens",),  # + ppl_texts when not 1: older cells match
        "passkey": ("depths", "trials", "answer_tokens"),
        "needle": ("depths", "trials", "answer_tokens"),
    }.get(kind)
    if names is None:  # hub
        names = tuple(f.name for f in dataclasses.fields(cfg) if f.name.startswith("hub_"))
    out = {n: getattr(cfg, n) for n in names}
    if kind == "ppl" and cfg.ppl_texts != 1:
        out["ppl_texts"] = cfg.ppl_texts
    if kind in ("passkey", "needle") and cfg.question_in_prompt:  # absent: older cells match
        out["question_in_prompt"] = True
    return out


def _quant_backend(spec: MethodSpec) -> tuple[str | None, str | None]:
    """(backend, None) when usable, else (None, reason)."""
    backends = [spec.backend] if spec.backend else list(QUANT_BACKENDS)
    reasons = []
    for b in backends:
        why = quantized_unavailable(b, spec.nbits)
        if why is None:
            return b, None
        reasons.append(why)
    return None, "; ".join(reasons)


def run_eval(
    model,
    *,
    calibration=None,
    methods=None,
    tasks=None,
    contexts=DEFAULT_CONTEXTS,
    out_dir,
    seed: int = 0,
    dtype: str = "auto",
    device_map=None,
    config: EvalConfig | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """Evaluate methods and baselines on tasks at context lengths; write and return results.

    ``model``: a model source (alias, folder, Hub id, exported kvsurgery folder) or a loaded
    ``(model, tokenizer[, ModelInfo])``. ``calibration``: a calibration folder whose KV-Dict
    state is installed on the model. ``methods``/``tasks``: names (see :func:`parse_method`,
    :func:`parse_task`), a list or a comma-separated string; default: the compressed method
    the model carries plus every baseline, and ``ppl, passkey, needle``. ``contexts``:
    token counts or ``"2k,4k"``. ``options``: fields of :class:`EvalConfig`.

    Returns the ``results.json`` content. Cells already in ``out_dir/cells.jsonl`` with the
    same settings are reused, not recomputed.
    """
    from tqdm.auto import tqdm

    from .calibrate import library_versions, write_json_atomic

    cfg = dataclasses.replace(config or EvalConfig(), **options)
    ctx_list = list(dict.fromkeys(parse_contexts(contexts)))
    task_specs = _unique(_split_list(tasks if tasks is not None else DEFAULT_TASKS, parse_task))
    if methods is not None:
        method_specs = _unique(_split_list(methods, parse_method))
    if not task_specs:
        raise KVSurgeryError(f"no task given; known tasks: {_TASK_HELP}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    hf_model, tok, info = load_for_eval(
        model, calibration=calibration, dtype=dtype, device_map=device_map
    )
    if methods is None:
        method_specs = [parse_method(m) for m in default_methods(hf_model, calibration)]
    compressed = [m.kind for m in method_specs if m.compressed]
    # A plain sink_window is one baseline per compressed method, memory matched to it.
    expanded = []
    for m in method_specs:
        if m.kind == "sink_window" and m.window is None and m.matched_to is None:
            if not compressed:
                raise KVSurgeryError(
                    f"method {m.name!r} matches the memory of a compressed method, but none is "
                    "evaluated; add one (e.g. kvdict with --calibration) or give a window, "
                    "e.g. sink_window:512."
                )
            expanded += [parse_method(f"sink_window@{c}") for c in compressed]
        else:
            expanded.append(m)
    method_specs = _unique(expanded)
    for m in method_specs:
        if m.matched_to is not None and m.matched_to not in compressed:
            raise KVSurgeryError(
                f"method {m.name!r} matches {m.matched_to}'s memory; evaluate {m.matched_to} too."
            )
    if not method_specs:
        raise KVSurgeryError(f"no method given; known methods: {_METHOD_HELP}.")
    states = _install_states(hf_model, calibration, method_specs)
    # Compressed methods first: the memory-matched baselines need their measured bytes.
    method_specs = sorted(method_specs, key=lambda m: not m.compressed)

    dims = _dims(hf_model)
    base = {
        "results_version": RESULTS_VERSION,
        "model": _model_fingerprint(hf_model, info),
        "dtype": str(hf_model.dtype),
        "seed": seed,
    }
    run = _Run(hf_model, tok, info, cfg, seed, dims, _fingerprint(base))

    cells_path = out / CELLS
    done = _read_cells(cells_path)
    cells, skipped, method_info = [], [], {}
    torch.manual_seed(seed)
    total = len(ctx_list) * len(method_specs) * len(task_specs)
    bar = tqdm(total=total, desc="eval", unit="cell", disable=not progress)
    for context in ctx_list:
        for m in method_specs:
            params, reason = {}, None
            if m.kind == "full":
                builder = full()
            elif m.compressed:
                hf_model._kvsurgery_state = states[m.kind]
                params = {"state": _state_fingerprint(states[m.kind])}
                builder = compressed_cache
            elif m.kind == "sink_window":
                window, matched = m.window, m.matched_to
                budget = states.get(matched, {}).get("token_budget") if matched else None
                if window is None and budget:
                    # A method that keeps everything but reads a token budget per step
                    # (ClusterKV) is compared with a window reading as many tokens.
                    window = max(1, int(budget) - cfg.n_sink)
                elif window is None:
                    refs = [c for c in cells if c["method"] == matched and c["context"] == context]
                    refs.sort(key=lambda c: c["task"] != "ppl")  # the ppl cell if there is one
                    ref = refs[0] if refs else None
                    if ref is None:
                        reason = f"no measured memory of {matched} at context {context} to match"
                    else:
                        n_ref = context + cfg.ppl_tokens
                        window = _window_for(run, ref["kv_bytes_per_token"] * n_ref, n_ref)
                params = {"n_sink": cfg.n_sink, "window": window, "matched_to": matched}
                builder = sink_window(cfg.n_sink, window) if window else None
            else:
                backend, reason = _quant_backend(m)
                # Groups must divide what is quantized along the channel axis (heads x
                # tokens x head_dim, any token count): a divisor of head_dim always does.
                group = math.gcd(cfg.quant_group, dims["head_dim"])
                params = {
                    "nbits": m.nbits,
                    "backend": backend,
                    "q_group_size": group,
                    "residual_length": cfg.quant_residual,
                }
                builder = (
                    quantized(
                        m.nbits, backend, q_group_size=group, residual_length=cfg.quant_residual
                    )
                    if backend
                    else None
                )
            method_info.setdefault(m.name, {"kind": m.kind, "params": {}})
            method_info[m.name]["params"][str(context)] = params
            for task in task_specs:
                cell_id = f"{m.name}|{task.name}|{context}"
                if reason is not None:
                    skipped.append(
                        {
                            "id": cell_id,
                            "method": m.name,
                            "task": task.name,
                            "context": context,
                            "status": "skipped",
                            "reason": reason,
                        }
                    )
                    bar.update(1)
                    continue
                fp = _fingerprint([run.base_fp, params, _task_settings(cfg, task.kind)])
                cell = done.get((cell_id, fp))
                if cell is None:
                    bar.set_postfix_str(cell_id)
                    cell = {
                        "id": cell_id,
                        "fingerprint": fp,
                        "method": m.name,
                        "task": task.name,
                        "context": context,
                        "params": params,
                        "status": "ok",
                        **run.run_cell(m, builder, task, context),
                    }
                    _append_cell(cells_path, cell)
                    done[(cell_id, fp)] = cell
                cells.append(cell)
                bar.update(1)
    bar.close()

    results = {
        "results_version": RESULTS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kvsurgery": __version__,
        "model": info,
        "model_fingerprint": base["model"],
        "dtype": base["dtype"],
        "dims": dims,
        "calibration": _calibration_record(calibration),
        "kv_state": {
            k: {n: v for n, v in st.items() if n != "modules"} for k, st in states.items()
        },
        "seed": seed,
        "contexts": ctx_list,
        "methods": method_info,
        "tasks": [t.name for t in task_specs],
        "settings": dataclasses.asdict(cfg),
        "versions": _versions(library_versions()),
        "fp16_full_bytes_per_token": fp16_full_bytes(dims, 1),
        "cells": cells,
        "skipped": skipped,
    }
    results["table"] = summary_rows(results)
    write_json_atomic(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(results))
    return results


def _versions(base: dict) -> dict:
    import importlib.metadata as md

    out = dict(base)
    for name in ("optimum-quanto", "hqq"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# -- reporting ----------------------------------------------------------------------------
def summary_rows(results: dict) -> list[dict]:
    """One row per (method, context): memory, perplexity (and ratio to full), accuracies."""
    by = {}
    for c in results["cells"]:
        by.setdefault((c["method"], c["context"]), {})[c["task"]] = c
    skipped = {}
    for s in results["skipped"]:
        skipped.setdefault((s["method"], s["context"]), s["reason"])
    rows = []
    for context in results["contexts"]:
        for method in results["methods"]:
            cells = by.get((method, context), {})
            row = {"method": method, "context": context}
            if (method, context) in skipped and not cells:
                row["skipped"] = skipped[(method, context)]
                rows.append(row)
                continue
            mem = cells.get("ppl") or next(iter(cells.values()), None)
            if mem is not None:
                row["kv_bytes_per_token"] = mem["kv_bytes_per_token"]
                row["kv_ratio_fp16"] = mem["kv_ratio_fp16"]
                row["memory_measured_on"] = mem["task"]
            if "ppl" in cells:
                row["perplexity"] = cells["ppl"]["metrics"]["perplexity"]
                ref = by.get(("full", context), {}).get("ppl")
                if ref is not None:
                    row["ppl_ratio_vs_full"] = row["perplexity"] / ref["metrics"]["perplexity"]
            for task in ("passkey", "needle"):
                if task in cells:
                    row[task] = cells[task]["metrics"]["accuracy"]
            for name, c in cells.items():
                if name.startswith("hub:"):
                    row[name] = {"em": c["metrics"]["em"], "f1": c["metrics"]["f1"]}
            params = results["methods"][method]["params"].get(str(context), {})
            if params.get("window"):
                row["window"] = params["window"]
            rows.append(row)
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def results_markdown(results: dict) -> str:
    rows = results.get("table") or summary_rows(results)
    hub = [t for t in results["tasks"] if t.startswith("hub:")]
    head = ["method", "context", "KV bytes/token", "% of fp16", "perplexity", "ppl ratio vs full"]
    head += ["passkey", "needle"] + [f"{t} EM / F1" for t in hub]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in rows:
        name = r["method"] + (f" (W={r['window']})" if r.get("window") else "")
        if "skipped" in r:
            cols = [name, str(r["context"]), "skipped"] + ["-"] * (len(head) - 3)
            notes.append(f"- {r['method']} at {r['context']}: skipped ({r['skipped']})")
        else:
            pct = r.get("kv_ratio_fp16")
            cols = [
                name,
                str(r["context"]),
                _fmt(r.get("kv_bytes_per_token"), ",.0f"),
                "-" if pct is None else f"{100 * pct:.1f}%",
                _fmt(r.get("perplexity"), ".3f"),
                _fmt(r.get("ppl_ratio_vs_full"), ".3f"),
                _fmt(r.get("passkey"), ".2f"),
                _fmt(r.get("needle"), ".2f"),
            ]
            cols += [f"{r[t]['em']:.3f} / {r[t]['f1']:.3f}" if t in r else "-" for t in hub]
        lines.append("| " + " | ".join(cols) + " |")
    model = results["model"].get("base_model") or results["model"].get("source") or "model"
    s = results["settings"]
    text = [
        f"# kvsurgery eval: {model}",
        "",
        f"dtype {results['dtype'].replace('torch.', '')}, seed {results['seed']}, "
        f"kvsurgery {results['kvsurgery']}, {results['created']}. Perplexity: "
        f"{s['ppl_tokens']} teacher-forced tokens after the context, read through the cache"
        + (f", on each of {s['ppl_texts']} disjoint texts" if s.get("ppl_texts", 1) > 1 else "")
        + ". "
        f"Passkey/needle: accuracy over depths {', '.join(str(d) for d in s['depths'])} "
        f"× {s['trials']} trial(s)"
        + (", question at the end of the prefilled prompt" if s.get("question_in_prompt") else "")
        + ". KV bytes/token: measured allocated bytes after prefill and "
        f"decode; % of fp16: of a full fp16 cache holding as many tokens "
        f"({results['fp16_full_bytes_per_token']:,} bytes/token).",
        "",
        *lines,
    ]
    dtype = results["dtype"].replace("torch.", "")
    if dtype in _HALF_DTYPES and any(r.get("perplexity") is not None for r in rows):
        text += ["", _HALF_PPL_NOTE.format(dtype=dtype)]
    if notes:
        text += ["", "Skipped:", *notes]
    return "\n".join(text) + "\n"


_HALF_DTYPES = ("bfloat16", "float16")
# Measured: one KV-Dict cell on SmolLM2 at 4k computed two numerically equivalent ways
# (kernel reference vs fp32 attention over reconstructed keys/values, outputs equal to
# 1e-6) gave perplexity 5.446 and 5.492 in bf16, 5.474 both times in fp32.
_HALF_PPL_NOTE = (
    "Perplexity in {dtype} carries rounding noise of about 1% (one cell computed two "
    "equivalent ways differed by 0.8%): compare methods' perplexity at --dtype float32."
)


# -- command ------------------------------------------------------------------------------
def _contexts_option(ctx, param, value):
    try:
        return parse_contexts(value)
    except KVSurgeryError as e:
        raise click.BadParameter(str(e)) from None


def _depths_option(ctx, param, value):
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give fractions, e.g. 0.1,0.5,0.9") from None


@click.command("eval")
@click.option(
    "--model",
    default=None,
    help="Model: alias, folder, Hub id, or an exported kvsurgery checkpoint "
    "(default: the calibration's model, else smollm2-135m).",
)
@click.option(
    "--calibration",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Calibration folder; its KV-Dict state is applied to --model (adds method kvdict).",
)
@click.option(
    "--methods",
    default=None,
    help=f"Comma-separated methods (default: the compressed method + every baseline): {_METHOD_HELP}.",
)
@click.option(
    "--tasks",
    default=",".join(DEFAULT_TASKS),
    show_default=True,
    help=f"Comma-separated tasks: {_TASK_HELP}.",
)
@click.option(
    "--context",
    "contexts",
    default="2k,4k,8k",
    show_default=True,
    callback=_contexts_option,
    help="Context lengths in tokens, comma-separated; k = 1024 (2k = 2048).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder (results.json, results.md, cells.jsonl); a rerun resumes it.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the task prompts.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Model dtype: auto, float32, bfloat16, float16.",
)
@click.option("--device-map", default=None, help='accelerate device map, e.g. "auto".')
@click.option(
    "--ppl-tokens",
    type=int,
    default=128,
    show_default=True,
    help="Tokens scored by teacher-forced decoding after the context.",
)
@click.option(
    "--ppl-texts",
    type=int,
    default=1,
    show_default=True,
    help="Disjoint text windows (consecutive, from the end of the corpus) the perplexity "
    "averages over; more give a sturdier comparison, each costs a prefill and --ppl-tokens steps.",
)
@click.option(
    "--depths",
    default="0.1,0.5,0.9",
    show_default=True,
    callback=_depths_option,
    help="Depths (fractions of the prompt) of the passkey / needle.",
)
@click.option("--trials", type=int, default=1, show_default=True, help="Prompts per depth.")
@click.option(
    "--answer-tokens",
    type=int,
    default=8,
    show_default=True,
    help="Tokens decoded greedily for passkey / needle answers.",
)
@click.option(
    "--question-in-prompt",
    is_flag=True,
    help="Passkey / needle: prefill the question with the context (all but its last token, "
    "the first step through the compressed cache) instead of feeding it after the context "
    "is compressed.",
)
@click.option(
    "--n-sink", type=int, default=4, show_default=True, help="Exact first tokens of sink_window."
)
@click.option(
    "--hub-question-col",
    default="question",
    show_default=True,
    help="Hub task: column holding the question.",
)
@click.option(
    "--hub-context-col",
    default="context",
    show_default=True,
    help="Hub task: column holding the document ('' for none).",
)
@click.option(
    "--hub-answer-col",
    default="answers",
    show_default=True,
    help="Hub task: column holding the answer(s) (string, list, or {'text': [...]}).",
)
@click.option(
    "--hub-limit", type=int, default=50, show_default=True, help="Hub task: examples to score."
)
@click.option(
    "--hub-max-new-tokens",
    type=int,
    default=32,
    show_default=True,
    help="Hub task: tokens decoded greedily per answer.",
)
@click.option("--no-progress", is_flag=True, help="Do not show a progress bar.")
def eval_command(
    model,
    calibration,
    methods,
    tasks,
    contexts,
    out,
    seed,
    dtype,
    device_map,
    ppl_tokens,
    ppl_texts,
    depths,
    trials,
    answer_tokens,
    question_in_prompt,
    n_sink,
    hub_question_col,
    hub_context_col,
    hub_answer_col,
    hub_limit,
    hub_max_new_tokens,
    no_progress,
):
    """Measure quality (perplexity, passkey, needle, Hub QA) and KV memory of every method
    and baseline the same way; writes results.json and results.md to --out."""
    results = run_eval(
        model,
        calibration=calibration,
        methods=methods,
        tasks=tasks,
        contexts=contexts,
        out_dir=out,
        seed=seed,
        dtype=dtype,
        device_map=device_map,
        progress=not no_progress,
        ppl_tokens=ppl_tokens,
        ppl_texts=ppl_texts,
        depths=depths,
        trials=trials,
        answer_tokens=answer_tokens,
        question_in_prompt=question_in_prompt,
        n_sink=n_sink,
        hub_question_col=hub_question_col,
        hub_context_col=hub_context_col or None,
        hub_answer_col=hub_answer_col,
        hub_limit=hub_limit,
        hub_max_new_tokens=hub_max_new_tokens,
    )
    click.echo(results_markdown(results))
    click.echo(f"results written to {out}")
