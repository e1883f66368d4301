"""Recipes: one config dataclass per method, written as YAML in ``recipes/``.

Precedence is defaults < recipe file < command-line flags. A recipe file looks like::

    method: kvdict            # which config class
    n_atoms: 1024             # fields of that class
    target_ratio: 0.2
    calibration:              # optional defaults for `kvsurgery calibrate` flags
      samples: 16
    layers:                   # optional per-layer overrides
      "0-1": {dense: true}    # by index, range "a-b", list "1,5", glob "2*",
      sliding_attention: {s_k: 12}   # or layer type (config.layer_types)

Every error names the key and is raised before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import KVSurgeryError


class RecipeError(KVSurgeryError):
    """A recipe (file or override) has an unknown key, a wrong type or an impossible value."""


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise RecipeError(f"{key}: {msg}")


@dataclass
class CalibrationConfig:
    """Settings of the capture run shared by every method."""

    samples: int = 8
    seq_len: int = 512
    max_vectors: int = 65536
    seed: int = 0
    capture_queries: bool = True

    def __post_init__(self):
        _require(self.samples > 0, "samples", f"must be > 0, got {self.samples}")
        _require(self.seq_len > 1, "seq_len", f"must be > 1, got {self.seq_len}")
        _require(self.max_vectors >= 16, "max_vectors", f"must be >= 16, got {self.max_vectors}")


ALLOCATIONS = ("reconstruction", "attention")
PROTECT_DTYPES = ("model", "int8", "int4")  # as runtime/kvs_cache.py reads them (a test checks)


@dataclass
class KVDictConfig:
    """KV-Dict (Lexico, arXiv 2412.08890): per-layer dictionaries, sparse-coded cache."""

    n_atoms: int = 1024  # N: atoms per dictionary (int16 indices allow up to 32767)
    # Non-zeros per key / value the dictionaries are learned at, and used at when no target
    # is given (with one, the allocation picks s per layer from their held-out curves).
    s_k: int = 8
    s_v: int = 8
    target_ratio: float | None = None  # KV bytes/token over fp16, all layers (e.g. 0.2)
    target_context: int = 4096  # context length at which target_ratio is met (sinks+buffer count)
    max_error: float | None = None  # or: smallest s with held-out relative error <= this
    s_min: int = 2
    s_max: int = 16
    # Relative weight of key over value error when sharing the byte budget. Measured on
    # SmolLM2-135M (recipes/kvdict.yaml with buffer 512, no protected tokens, 4k prefix,
    # fp32 perplexity vs the full cache): key_weight 1.5 -> 1.031x, 3 -> 1.021x, 6 -> 1.022x.
    # Exact keys with coded values give 1.005x, exact values with coded keys 1.024x: the
    # score error of the keys costs far more than their relative error says. Only used by
    # allocation "reconstruction" ("attention" measures what each costs).
    key_weight: float = 3.0
    # Keys are coded in the metric of the queries that will read them: per KV head and
    # rotary pair, keys are scaled by E[q²]^(query_weighting/2) before learning and OMP, and
    # queries by the inverse at decode, so OMP spends atoms where score errors are large.
    # 0 codes keys as they are. 0.5 measured on SmolLM2-135M: see dictlearn.query_key_maps
    # and the README table.
    query_weighting: float = 0.5
    # What the per-layer allocation minimises. "reconstruction": held-out relative error of
    # the vectors (key gains times key_weight). "attention": the error the codes cause in
    # attention outputs, replayed on the captured queries, keys and values (sinks and
    # buffer exact), in one unit for keys and values and for every layer; max_error then
    # bounds that relative squared error. Measured on SmolLM2-135M at 20% (12 windows):
    # 1.017x full ppl vs 1.025x, at equal bytes (s_min 2).
    allocation: str = "reconstruction"
    iters: int = 6  # MOD iterations (held-out error flattens after a few)
    holdout: float = 0.1  # share of captured vectors kept out of training
    sinks: int = 4  # exact tokens at the start
    buffer: int = 128  # exact recent tokens
    flush: int = 16  # tokens encoded at once when the buffer overflows
    # Exact tokens per sequence chosen by the prompt's last queries when the prompt is
    # encoded (a question at the end of the prompt keeps the passage it asks about); they
    # count in the byte target. 0: none.
    protect: int = 0
    # How protected tokens are stored: "model" (the model's dtype, exact), "int8" (one
    # absmax scale per token and kv head; half the bytes, about 1% relative error) or
    # "int4" (a step and a minimum per 32 channels; 31% of the bytes, about 7% error).
    protect_dtype: str = "model"
    omp_tol: float | None = None  # optional early stop of OMP at runtime
    coef_dtype: str = "float8_e4m3fn"  # float16/float32 only for tests of the lossless limit
    dense: bool = False  # keep this layer uncompressed (per-layer override)
    seed: int = 0

    per_layer_fields: typing.ClassVar[tuple[str, ...]] = ("s_k", "s_v", "dense")

    def __post_init__(self):
        _require(
            1 <= self.n_atoms <= 32767,
            "n_atoms",
            f"must be in 1..32767 (int16 indices), got {self.n_atoms}",
        )
        for k in ("s_k", "s_v", "s_min", "s_max"):
            v = getattr(self, k)
            _require(v >= 1, k, f"must be >= 1, got {v}")
            _require(v <= self.n_atoms, k, f"must be <= n_atoms ({self.n_atoms}), got {v}")
        _require(
            self.s_min <= self.s_max, "s_min", f"must be <= s_max ({self.s_max}), got {self.s_min}"
        )
        _require(
            self.target_ratio is None or self.max_error is None,
            "target_ratio",
            "give either target_ratio or max_error, not both",
        )
        if self.target_ratio is not None:
            _require(
                0 < self.target_ratio <= 1,
                "target_ratio",
                f"must be in (0, 1], got {self.target_ratio}",
            )
        if self.max_error is not None:
            _require(
                0 < self.max_error < 1, "max_error", f"must be in (0, 1), got {self.max_error}"
            )
        _require(self.iters >= 1, "iters", f"must be >= 1, got {self.iters}")
        _require(self.key_weight > 0, "key_weight", f"must be > 0, got {self.key_weight}")
        _require(
            0 <= self.query_weighting <= 1,
            "query_weighting",
            f"must be in [0, 1], got {self.query_weighting}",
        )
        _require(
            self.allocation in ALLOCATIONS,
            "allocation",
            f"must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}",
        )
        _require(0 < self.holdout < 1, "holdout", f"must be in (0, 1), got {self.holdout}")
        _require(self.sinks >= 0, "sinks", f"must be >= 0, got {self.sinks}")
        _require(self.buffer >= 1, "buffer", f"must be >= 1, got {self.buffer}")
        _require(self.flush >= 1, "flush", f"must be >= 1, got {self.flush}")
        _require(self.protect >= 0, "protect", f"must be >= 0, got {self.protect}")
        _require(
            self.protect_dtype in PROTECT_DTYPES,
            "protect_dtype",
            f"must be one of {', '.join(PROTECT_DTYPES)}, got {self.protect_dtype!r}",
        )
        _require(
            self.target_context >= 1, "target_context", f"must be >= 1, got {self.target_context}"
        )
        _require(
            self.sinks + self.buffer + self.protect < self.target_context,
            "protect",
            f"sinks + buffer + protect ({self.sinks + self.buffer + self.protect}) leave nothing "
            f"to compress at target_context {self.target_context}; lower them or raise "
            "target_context",
        )
        _require(
            self.coef_dtype in ("float8_e4m3fn", "float16", "float32"),
            "coef_dtype",
            f"must be float8_e4m3fn, float16 or float32, got {self.coef_dtype!r}",
        )
        if self.omp_tol is not None:
            _require(0 <= self.omp_tol < 1, "omp_tol", f"must be in [0, 1), got {self.omp_tol}")


@dataclass
class ClusterKVConfig:
    """ClusterKV (recall tokens by semantic cluster): calibrated per-layer budget share,
    tokens per cluster and dense layers under a total token budget."""

    budget: int = 512  # tokens read per decode step and kv head, mean over layers (sinks,
    # window, pending and selected tokens; a dense layer counts target_context)
    target_context: int = 4096  # context length at which the budget shares are chosen
    sinks: int = 16  # exact tokens at the start
    window: int = 64  # exact recent tokens
    tokens_per_cluster: int = 32  # default (and the only choice when calibrate is false)
    tpc_choices: list = field(default_factory=lambda: [16, 32, 64])
    append_every: int = 128  # tokens leaving the window clustered together
    append_clusters: int = 4
    kmeans_iters: int = 10
    calibrate: bool = True  # False: the same settings for every layer, recall still reported
    allow_dense: bool = True  # the calibration may keep layers dense when that pays
    offload: bool = False  # full K/V in host memory, only the working set on the device
    estimate_rest: bool = False  # unread cluster members as one pseudo-token per cluster
    spread_ranking: bool = False  # rank clusters by centroid logit + key spread along q
    dense: bool = False  # keep this layer uncompressed (per-layer override)
    seed: int = 0

    per_layer_fields: typing.ClassVar[tuple[str, ...]] = ("tokens_per_cluster", "dense")

    def __post_init__(self):
        for k in ("sinks", "window", "seed"):
            _require(getattr(self, k) >= 0, k, f"must be >= 0, got {getattr(self, k)}")
        for k in ("tokens_per_cluster", "append_every", "append_clusters", "kmeans_iters"):
            _require(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        exact = self.sinks + self.window
        _require(
            self.budget > exact,
            "budget",
            f"must exceed sinks + window ({exact}): it counts them, got {self.budget}",
        )
        _require(
            self.target_context > self.budget,
            "target_context",
            f"must exceed budget ({self.budget}), got {self.target_context}",
        )
        _require(
            self.append_clusters <= self.append_every,
            "append_clusters",
            f"must be <= append_every ({self.append_every}), got {self.append_clusters}",
        )
        _require(
            len(self.tpc_choices) > 0
            and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in self.tpc_choices
            ),
            "tpc_choices",
            f"must be a non-empty list of ints >= 1, got {self.tpc_choices!r}",
        )


@dataclass
class SubGenConfig:
    """SubGen (streaming threshold clustering of keys + l2 value sampling): sublinear-memory
    cache. Calibration picks the cluster radius per layer (and kv head) to meet a memory
    target, and optionally t / s per layer to meet a measured attention-output error.

    ``estimator: mean`` (beyond the paper) keeps per cluster the mean key, mean value and
    count instead of sampled keys and a value reservoir: no radius, t or s; the cluster cap
    comes from the memory target and the clusters from k-means when it is first reached.

    ``protect`` (mean estimator, beyond the paper) moves that share of each layer's cluster
    budget to tokens kept exact: those the prompt's last ``protect_window`` queries attend
    to most (the highest score over layers, max-pooled over ``protect_pool`` positions)."""

    target_ratio: float = 0.25  # cache bytes over the fp16 full cache at target_context
    target_context: int = 8192
    t: int = 4  # key samples per cluster
    s: int = 256  # value reservoir slots
    target_error: float | None = None  # pick t, s per layer: cheapest with error <= this
    t_choices: list = field(default_factory=lambda: [2, 4, 8])
    s_choices: list = field(default_factory=lambda: [128, 256, 512])
    delta: float | None = None  # fixed radius for every layer and head (no radius search)
    delta_rel: float = 0.5  # training-free radius: this times the median key norm per head
    per_head: bool = True  # one radius per kv head (else one per layer)
    # cap each head's clusters at what target_ratio leaves at target_context (a key then
    # joins the nearest centre): memory stops growing there. false: unbounded (the paper)
    cap_clusters: bool = True
    estimator: str = "sampled"  # "sampled" (the paper's) or "mean" (cluster means, beyond it)
    kmeans_iters: int = 6  # mean estimator: Lloyd rounds when the cap is first reached
    protect: float = 0.0  # mean estimator: share of the cluster budget kept as exact tokens
    protect_window: int = 32  # prompt queries whose attention chooses the protected tokens
    protect_pool: int = 9  # positions a chosen token's score spreads to (max-pool width)
    sinks: int = 4  # exact tokens at the start
    window: int = 256  # exact recent tokens
    sim_tokens: int = 4096  # captured keys per head streamed to simulate a context
    eval_queries: int = 64  # captured queries per kv head for the error measurement
    dense: bool = False  # keep this layer uncompressed (per-layer override)
    seed: int = 0

    per_layer_fields: typing.ClassVar[tuple[str, ...]] = ("t", "s", "delta", "dense")

    def __post_init__(self):
        _require(
            0 < self.target_ratio <= 1,
            "target_ratio",
            f"must be in (0, 1], got {self.target_ratio}",
        )
        _require(
            self.estimator in ("sampled", "mean"),
            "estimator",
            f"must be 'sampled' (the paper's) or 'mean', got {self.estimator!r}",
        )
        _require(
            self.estimator != "mean" or self.cap_clusters,
            "cap_clusters",
            "must be true with estimator: mean (the cap is the number of cluster means kept)",
        )
        _require(0 <= self.protect < 1, "protect", f"must be in [0, 1), got {self.protect}")
        _require(
            self.protect == 0 or self.estimator == "mean",
            "protect",
            "needs estimator: mean (protected tokens take the place of cluster means)",
        )
        for k in ("t", "s", "window", "sim_tokens", "eval_queries", "kmeans_iters"):
            _require(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("protect_window", "protect_pool"):
            _require(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("sinks", "seed"):
            _require(getattr(self, k) >= 0, k, f"must be >= 0, got {getattr(self, k)}")
        if self.delta is not None:
            _require(self.delta > 0, "delta", f"must be > 0, got {self.delta}")
        _require(self.delta_rel > 0, "delta_rel", f"must be > 0, got {self.delta_rel}")
        if self.target_error is not None:
            _require(self.target_error > 0, "target_error", f"must be > 0, got {self.target_error}")
        for k in ("t_choices", "s_choices"):
            v = getattr(self, k)
            _require(
                len(v) > 0
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in v),
                k,
                f"must be a non-empty list of ints >= 1, got {v!r}",
            )
        exact = self.sinks + self.window
        _require(
            self.target_context > exact,
            "target_context",
            f"must exceed sinks + window ({exact}), got {self.target_context}",
        )
        _require(
            self.target_ratio > exact / self.target_context,
            "target_ratio",
            f"{self.target_ratio} is below what sinks + window alone keep at target_context "
            f"({exact}/{self.target_context}); lower window or raise target_ratio",
        )


METHODS: dict[str, type] = {
    "kvdict": KVDictConfig,
    "clusterkv": ClusterKVConfig,
    "subgen": SubGenConfig,
}


@dataclass
class Recipe:
    """A method config plus calibration defaults and per-layer overrides."""

    method: str
    config: typing.Any
    calibration: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)  # selector -> {field: value}
    source: str = "<defaults>"

    def for_layer(self, idx: int, layer_type: str = "full_attention"):
        """The config with the overrides that select layer ``idx`` applied, in file order."""
        cfg = self.config
        for selector, values in self.layers.items():
            if _selects(selector, idx, layer_type):
                cfg = dataclasses.replace(cfg, **values)
        return cfg

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            **dataclasses.asdict(self.config),
            "calibration": dict(self.calibration),
            "layers": {k: dict(v) for k, v in self.layers.items()},
        }


def _selects(selector: str, idx: int, layer_type: str) -> bool:
    sel = str(selector).strip()
    if sel == layer_type:
        return True
    for part in sel.split(","):
        part = part.strip()
        if "-" in part and all(p.strip().isdigit() for p in part.split("-", 1)):
            a, b = (int(p) for p in part.split("-", 1))
            if a <= idx <= b:
                return True
        elif part.isdigit():
            if int(part) == idx:
                return True
        elif fnmatch.fnmatchcase(str(idx), part):
            return True
    return False


def _check_selector(sel: str) -> None:
    sel = str(sel).strip()
    if sel in ("full_attention", "sliding_attention", "chunked_attention"):
        return
    for part in sel.split(","):
        part = part.strip()
        ok = (
            part.isdigit()
            or ("-" in part and all(p.strip().isdigit() for p in part.split("-", 1)))
            or any(c in part for c in "*?[")
        )
        _require(
            ok,
            f"layers.{sel}",
            "a layer selector is an index (3), a range (0-3), a list (1,5), a glob (2*) or a "
            "layer type (full_attention, sliding_attention)",
        )


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def build_config(cls, values: dict, where: str = ""):
    """Instantiate ``cls`` from ``values`` after checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key, val in values.items():
        _require(key in names, f"{prefix}{key}", f"unknown key; valid keys are {sorted(names)}")
        _require(
            _type_ok(val, hints[key]),
            f"{prefix}{key}",
            f"expected {_type_name(hints[key])}, got {type(val).__name__} {val!r}",
        )
    vals = {
        k: float(v) if hints[k] is float and isinstance(v, int) else v for k, v in values.items()
    }
    try:
        return cls(**vals)
    except RecipeError as e:
        raise RecipeError(f"{prefix}{e}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist; see recipes/ for examples.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from e
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of keys to values")
    data = dict(data)
    method = data.pop("method", None)
    _require(
        method in METHODS,
        "method",
        f"{source}: must be one of {sorted(METHODS)}, got {method!r}",
    )
    cls = METHODS[method]
    calibration = data.pop("calibration", None) or {}
    _require(isinstance(calibration, dict), "calibration", "must be a mapping")
    build_config(CalibrationConfig, calibration, "calibration")  # validate now
    layers = data.pop("layers", None) or {}
    _require(isinstance(layers, dict), "layers", "must be a mapping of selector -> overrides")
    config = build_config(cls, data)
    clean_layers = {}
    for sel, over in layers.items():
        _check_selector(sel)
        _require(isinstance(over, dict), f"layers.{sel}", "must be a mapping of field -> value")
        for key in over:
            _require(
                key in cls.per_layer_fields,
                f"layers.{sel}.{key}",
                f"cannot be set per layer; per-layer keys are {list(cls.per_layer_fields)}",
            )
        build_config(cls, {**_public(config), **over}, f"layers.{sel}")
        clean_layers[str(sel)] = dict(over)
    return Recipe(method, config, calibration, clean_layers, source)


def _public(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def apply_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """Command-line ``--set key=value`` overrides (highest precedence)."""
    if not overrides:
        return recipe
    config = build_config(type(recipe.config), {**_public(recipe.config), **overrides})
    return dataclasses.replace(recipe, config=config)


def parse_set_options(items: list[str]) -> dict:
    """``["n_atoms=512", "target_ratio=0.2"]`` -> typed dict (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        key, val = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(val)
    return out


def default_recipe(method: str) -> Recipe:
    _require(method in METHODS, "method", f"must be one of {sorted(METHODS)}, got {method!r}")
    return Recipe(method, METHODS[method](), source="<defaults>")


def resolve_calibration(recipes: list[Recipe], cli: dict) -> CalibrationConfig:
    """defaults < each recipe's ``calibration:`` block (in order) < CLI flags that were given."""
    merged: dict = {}
    for r in recipes:
        merged.update(r.calibration)
    merged.update({k: v for k, v in cli.items() if v is not None})
    return build_config(CalibrationConfig, merged, "calibration")
