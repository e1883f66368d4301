"""`kvsurgery bench`: speed and memory of every method against dense attention, one run.

Three measurements, all in the same process and on the same device:

- **decode**: one layer's attention for one new token over a cache of ``context`` tokens,
  per method and against dense SDPA (``enable_gqa=True``, the fast form; see PERF.md),
  for each batch size. A method's step is what its runtime cache layer does per decode
  step (``layer.attend``: selection included), on state built for the shape: KV-Dict with
  random unit-norm dictionaries and random codes (timing does not depend on what the
  codes say), ClusterKV by clustering random keys with its own k-means. CUDA: events
  around each call (eager, launches included) and around CUDA-graph replays (GPU time),
  median after warm-up; inputs rotate among enough copies to exceed twice the L2 cache so
  a layer reads its state from memory as in a real step. CPU: ``perf_counter``, and the
  numbers are those of the torch reference paths. The bytes each method's state holds
  are read from its tensors' storages (``nbytes``), per token and kv head set of a layer.
- **prefill**: the compression work one prefill costs per layer (OMP encoding of keys
  and values, k-means of the keys) next to that prefill's causal attention time.
- **generate** (``--model``): end-to-end ``model.generate`` tokens/s at a context, dense
  and with each method installed on the model (random dictionaries for KV-Dict).

A method is one :class:`~kvsurgery.bench_methods.BenchMethod` entry in
:data:`kvsurgery.bench_methods.METHODS`: how to build its decode
state for a shape, how to run one decode step on it, an fp32 reference of that step, its
prefill-side cost, and how to install it on a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import click

from .errors import KVSurgeryError

# This module is imported when the CLI starts: torch and the kernels are imported by
# kvsurgery.bench_methods (the method table and the measurements) only when a bench runs.

DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
GPU_CONTEXTS = (4096, 8192, 32768, 131072)
GPU_BATCHES = (1, 8)
CPU_CONTEXTS = (1024, 2048)
CPU_BATCHES = (1,)
# Input sets per cell are capped: beyond a few the rotation only costs memory.
_MAX_COPIES = 16


# -- settings -----------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """Everything a bench run depends on; saved in the JSON. None = device default."""

    contexts: tuple[int, ...] | None = None
    batches: tuple[int, ...] | None = None
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    methods: tuple[str, ...] | None = None  # None = every available method
    # KV-Dict
    s_k: int = 8
    s_v: int = 8
    n_atoms: int = 4096
    kvdict_sinks: int = 4
    kvdict_buffer: int = 128
    # ClusterKV
    budget: int = 1024
    cluster_sinks: int = 16
    window: int = 128
    tokens_per_cluster: int = 80
    kmeans_iters: int = 20
    cluster_estimate_rest: bool = False
    cluster_spread_ranking: bool = False
    # SubGen
    subgen_t: int = 4
    subgen_s: int = 256
    subgen_sinks: int = 4
    subgen_window: int = 256
    subgen_delta_rel: float = 0.5
    subgen_cluster_tokens: int = 80
    subgen_estimator: str = "sampled"
    subgen_max_clusters: int | None = None
    # timing
    repeats: int | None = None  # CUDA 200, CPU 5
    warmup: int | None = None  # CUDA 20, CPU 1
    graphs: bool = True
    prefill: bool = True
    prefill_batch: int = 1
    prefill_repeats: int | None = None  # CUDA 3, CPU 1
    # end to end
    model: str | None = None
    gen_context: int | None = None  # CUDA 4096, CPU 256
    gen_tokens: int = 32
    gen_batch: int = 1
    seed: int = 0
    device: str | None = None
    threads: int | None = None  # torch CPU threads (None = torch's default)

    def __post_init__(self):
        self.dtype = _DTYPE_ALIASES.get(str(self.dtype).lower(), str(self.dtype).lower())
        if self.dtype not in DTYPES:
            raise KVSurgeryError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        for name in ("heads", "kv_heads", "head_dim", "s_k", "s_v", "n_atoms", "budget"):
            _check_min(name, getattr(self, name), 1)
        for name in ("subgen_t", "subgen_s", "subgen_window", "subgen_cluster_tokens"):
            _check_min(name, getattr(self, name), 1)
        _check_min("subgen_sinks", self.subgen_sinks, 0)
        if not isinstance(self.subgen_delta_rel, (int, float)) or not self.subgen_delta_rel > 0:
            raise KVSurgeryError(f"--subgen-delta-rel must be > 0, got {self.subgen_delta_rel!r}.")
        if self.subgen_estimator not in ("sampled", "mean"):
            raise KVSurgeryError(
                f"--subgen-estimator must be sampled or mean, got {self.subgen_estimator!r}."
            )
        if self.subgen_max_clusters is not None:
            _check_min("subgen_max_clusters", self.subgen_max_clusters, 1)
        elif self.subgen_estimator == "mean":
            raise KVSurgeryError(
                "--subgen-estimator mean needs --subgen-max-clusters (the cluster means kept)."
            )
        for name in ("tokens_per_cluster", "kmeans_iters", "gen_tokens", "gen_batch"):
            _check_min(name, getattr(self, name), 1)
        for name in ("kvdict_sinks", "kvdict_buffer", "cluster_sinks", "window"):
            _check_min(name, getattr(self, name), 0)
        _check_min("prefill_batch", self.prefill_batch, 1)
        for name in ("repeats", "prefill_repeats", "gen_context", "threads"):
            if getattr(self, name) is not None:
                _check_min(name, getattr(self, name), 1)
        if self.warmup is not None:
            _check_min("warmup", self.warmup, 0)
        if self.heads % self.kv_heads:
            raise KVSurgeryError(
                f"--heads {self.heads} is not a multiple of --kv-heads {self.kv_heads}."
            )
        if self.s_k > self.n_atoms or self.s_v > self.n_atoms:
            raise KVSurgeryError(
                f"--s-k/--s-v ({self.s_k}/{self.s_v}) cannot exceed --n-atoms {self.n_atoms}."
            )
        if self.n_atoms > 65536:
            raise KVSurgeryError(f"--n-atoms {self.n_atoms}: int16 codes hold at most 65536 atoms.")
        for name in ("contexts", "batches"):
            vals = getattr(self, name)
            if vals is not None:
                vals = tuple(int(v) for v in vals)
                if not vals or min(vals) < 1:
                    raise KVSurgeryError(f"--{name} must be positive integers, got {vals}.")
                setattr(self, name, vals)
        if self.methods is not None:
            from .bench_methods import METHODS, available_methods

            self.methods = tuple(self.methods)
            unknown = [m for m in self.methods if m not in METHODS and m != "dense"]
            if unknown:
                raise KVSurgeryError(
                    f"unknown method {unknown[0]!r}; available: {', '.join(available_methods())} "
                    "(dense SDPA is always measured)."
                )
            missing = [m for m in self.methods if m in METHODS and METHODS[m].missing()]
            if missing:
                m = missing[0]
                raise KVSurgeryError(f"method {m!r} is not available here: {METHODS[m].missing()}.")
            self.methods = tuple(m for m in dict.fromkeys(self.methods) if m != "dense")
        if self.device is not None:
            if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
                raise KVSurgeryError(f"--device must be cpu or cuda[:N], got {self.device!r}.")
            import torch

            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise KVSurgeryError("--device cuda: no CUDA device is visible to torch.")

    def resolve(self, device) -> BenchConfig:
        """Fill the device defaults; checks that need them (context vs exact tokens)."""
        from .bench_methods import METHODS, available_methods

        cuda = device.type == "cuda"
        out = BenchConfig(**{**asdict(self), "device": str(device)})
        out.contexts = out.contexts or (GPU_CONTEXTS if cuda else CPU_CONTEXTS)
        out.batches = out.batches or (GPU_BATCHES if cuda else CPU_BATCHES)
        out.methods = out.methods if out.methods is not None else tuple(available_methods())
        out.repeats = out.repeats or (200 if cuda else 5)
        out.warmup = out.warmup if out.warmup is not None else (20 if cuda else 1)
        out.prefill_repeats = out.prefill_repeats or (3 if cuda else 1)
        out.gen_context = out.gen_context or (4096 if cuda else 256)
        out.graphs = bool(out.graphs and cuda)
        for m in out.methods:
            need = METHODS[m].min_context(out)
            short = [c for c in out.contexts if c < need]
            if short:
                raise KVSurgeryError(
                    f"context {short[0]} leaves no compressed tokens for {m} (it keeps "
                    f"{need - 1} exact); give contexts >= {need} or fewer exact tokens."
                )
        return out


def _check_min(name: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise KVSurgeryError(
            f"--{name.replace('_', '-')} must be an integer >= {lo}, got {value!r}."
        )


# -- reporting ----------------------------------------------------------------------------
def device_label(record: dict) -> str:
    if record["cpu_numbers"]:
        return ("CPU NUMBERS: torch reference paths on the CPU (perf_counter); they say nothing "
                "about GPU speed")  # fmt: skip
    return f"GPU: {record['name']} (CUDA events; graph replays where capturable)"


def _methods_in(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def results_table(results: dict) -> str:
    """The tables printed last: decode time and speed-up, bytes per token, prefill, generate."""
    rec = results["device"]
    s = results["settings"]
    lines = [f"# {device_label(rec)}"]
    lines.append(
        f"# shape: {s['heads']} query / {s['kv_heads']} kv heads, d={s['head_dim']}, {s['dtype']}; "
        f"kvdict s_k={s['s_k']} s_v={s['s_v']} N={s['n_atoms']} (random unit-norm dictionaries, per-pair key map); "
        f"clusterkv budget={s['budget']} window={s['window']}"
        f"{' estimate_rest' if s.get('cluster_estimate_rest') else ''}"
        f"{' spread_ranking' if s.get('cluster_spread_ranking') else ''}; subgen t={s['subgen_t']} "
        f"s={s['subgen_s']} window={s['subgen_window']} delta_rel={s['subgen_delta_rel']} "
        f"estimator={s.get('subgen_estimator', 'sampled')} "
        f"max_clusters={s.get('subgen_max_clusters')}"
    )
    dec = results["decode"]
    methods = _methods_in(dec)
    cells = {(r["batch"], r["context"], r["method"]): r for r in dec}
    keys = list(dict.fromkeys((r["batch"], r["context"]) for r in dec))
    timed = "graph replays" if any(r.get("graph_us") for r in dec) else (
        "CUDA events" if not rec["cpu_numbers"] else "perf_counter")  # fmt: skip
    lines += ["", f"## decode attention per layer, median us ({timed}); x = speed-up vs dense"]
    head = f"{'batch':>5} {'context':>8}" + "".join(
        f" {m + ' us':>13}" + ("" if m == "dense" else f" {'x':>6}") for m in methods
    )
    lines.append(head)
    for b, c in keys:
        line = f"{b:>5} {c:>8}"
        for m in methods:
            r = cells.get((b, c, m))
            if r is None:
                line += f" {'-':>13}" + ("" if m == "dense" else f" {'-':>6}")
                continue
            line += f" {r['us']:>13.1f}"
            if m != "dense":
                sp = r.get("speedup_vs_dense")
                line += f" {sp:>6.2f}" if sp else f" {'-':>6}"
        lines.append(line)
    errs = [f"{r['method']} b{r['batch']} {r['rel_err_vs_fp32_ref']:.1e}"
            + ("  <-- CHECK" if r["rel_err_vs_fp32_ref"] > 2e-2 or not r["finite"] else "")
            for r in dec if r.get("rel_err_vs_fp32_ref") is not None]  # fmt: skip
    if errs:
        lines.append("# relative error vs fp32 reference (first context): " + ", ".join(errs))
    for r in dec:
        if r.get("graph_error"):
            lines.append(
                f"# {r['method']} b{r['batch']} c{r['context']}: no graph ({r['graph_error'][:80]})"
            )
    lines += ["", "## KV bytes per token of one sequence, one layer (allocated storage)"]
    lines.append(f"{'batch':>5} {'context':>8}" + "".join(f" {m:>13}" for m in methods))
    for b, c in keys:
        line = f"{b:>5} {c:>8}"
        for m in methods:
            r = cells.get((b, c, m))
            line += f" {r['bytes_per_token']:>13.1f}" if r else f" {'-':>13}"
        lines.append(line)
    fixed = {m: cells[k + (m,)]["fixed_bytes"] for k in keys[:1] for m in methods
             if cells.get(k + (m,)) and cells[k + (m,)]["fixed_bytes"]}  # fmt: skip
    if fixed:
        lines.append("# plus per layer, whatever the context: " + ", ".join(
            f"{m} {_human_bytes(v)}" for m, v in fixed.items()))  # fmt: skip
    pre = results.get("prefill") or []
    if pre:
        lines += ["", f"## prefill-side cost per layer, batch {pre[0]['batch']}, median ms "
                      "(x = multiple of the prefill attention time)"]  # fmt: skip
        pm = _methods_in(pre)
        lines.append(f"{'context':>8}" + "".join(
            f" {('attention' if m == 'dense' else m) + ' ms':>14}" + ("" if m == "dense" else f" {'x':>7}")
            for m in pm))  # fmt: skip
        pc = {(r["context"], r["method"]): r for r in pre}
        for c in dict.fromkeys(r["context"] for r in pre):
            line = f"{c:>8}"
            for m in pm:
                r = pc.get((c, m))
                line += f" {r['ms']:>14.2f}" if r else f" {'-':>14}"
                if m != "dense":
                    x = r and r.get("vs_prefill_attention")
                    line += f" {x:>7.1f}" if x else f" {'-':>7}"
            lines.append(line)
        lines.append("# " + "; ".join(f"{r['method']}: {r['what']}" for r in pre
                                      if r["context"] == pre[0]["context"]))  # fmt: skip
    gen = results.get("generate")
    if gen:
        lines += ["", f"## generate: {gen['model']['source']}, batch {gen['batch']}, context "
                      f"{gen['context']}, {gen['new_tokens']} new tokens"]  # fmt: skip
        lines.append(f"{'method':>10} {'tokens/s':>10} {'decode tok/s':>13} {'prefill s':>10} "
                     f"{'cache B/token':>14}")  # fmt: skip
        for r in gen["rows"]:
            dts = r["decode_tokens_per_s"]
            lines.append(
                f"{r['method']:>10} {r['tokens_per_s']:>10.1f} "
                f"{(f'{dts:.1f}' if dts else '-'):>13} {r['prefill_s']:>10.3f} "
                f"{r['cache_bytes_per_token']:>14.1f}"
            )
    for sk in results.get("skipped", []):
        lines.append(f"# skipped: {sk}")
    for f in results.get("failed", []):
        lines.append(f"# FAILED: {f}")
    return "\n".join(lines)


def plot_results(results: dict, path: str) -> bool:
    """Time vs context per method, one panel per batch size (log-log). False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dec = results["decode"]
    batches = list(dict.fromkeys(r["batch"] for r in dec))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for m in _methods_in(dec):
            pts = sorted(
                (r["context"], r["us"]) for r in dec if r["batch"] == b and r["method"] == m
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=m if m != "dense" else "dense SDPA")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode attention per layer (us)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    rec = results["device"]
    title = "CPU NUMBERS (torch reference paths)" if rec["cpu_numbers"] else rec["name"]
    fig.suptitle(f"kvsurgery bench: {title}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- command ------------------------------------------------------------------------------
def _ints(ctx, param, value):
    if value is None:
        return None
    out = []
    for part in str(value).split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = 1024 if p.endswith("k") else 1
        try:
            n = int(p[:-1] if mult > 1 else p) * mult
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a whole number (k = 1024 allowed)") from None
        if n < 1:
            raise click.BadParameter(f"{part!r} must be >= 1")
        out.append(n)
    if not out:
        raise click.BadParameter("give at least one value")
    return tuple(out)


def _names(ctx, param, value):
    if value is None:
        return None
    return tuple(p.strip().lower() for p in value.split(",") if p.strip())


@click.command("bench")
@click.option(
    "--contexts",
    callback=_ints,
    default=None,
    help="Context lengths, comma-separated, k = 1024 (default GPU 4k,8k,32k,128k; CPU 1k,2k).",
)
@click.option(
    "--batch",
    "batches",
    callback=_ints,
    default=None,
    help="Batch sizes, comma-separated (default GPU 1,8; CPU 1).",
)
@click.option("--heads", type=int, default=32, show_default=True, help="Query heads.")
@click.option("--kv-heads", type=int, default=8, show_default=True, help="KV heads.")
@click.option("--head-dim", type=int, default=128, show_default=True, help="Head dimension d.")
@click.option(
    "--dtype",
    default="bfloat16",
    show_default=True,
    help="Activation / KV dtype: bfloat16, float16, float32.",
)
@click.option(
    "--methods",
    callback=_names,
    default=None,
    help="Comma-separated methods (default: all available: kvdict, clusterkv, subgen); "
    "dense SDPA is always measured.",
)
@click.option("--s-k", type=int, default=8, show_default=True, help="KV-Dict atoms per key.")
@click.option("--s-v", type=int, default=8, show_default=True, help="KV-Dict atoms per value.")
@click.option(
    "--n-atoms",
    type=int,
    default=4096,
    show_default=True,
    help="KV-Dict dictionary size N (keys and values).",
)
@click.option(
    "--kvdict-sinks", type=int, default=4, show_default=True, help="KV-Dict exact first tokens."
)
@click.option(
    "--kvdict-buffer", type=int, default=128, show_default=True, help="KV-Dict exact recent tokens."
)
@click.option(
    "--budget",
    type=int,
    default=1024,
    show_default=True,
    help="ClusterKV clustered tokens read per step and kv head.",
)
@click.option(
    "--cluster-sinks", type=int, default=16, show_default=True, help="ClusterKV exact first tokens."
)
@click.option(
    "--window", type=int, default=128, show_default=True, help="ClusterKV exact recent window."
)
@click.option(
    "--tokens-per-cluster",
    type=int,
    default=80,
    show_default=True,
    help="ClusterKV prefill tokens per cluster.",
)
@click.option(
    "--kmeans-iters", type=int, default=20, show_default=True, help="ClusterKV k-means iterations."
)
@click.option(
    "--cluster-estimate-rest",
    is_flag=True,
    help="ClusterKV: unread cluster members as one pseudo-token per cluster (estimate_rest).",
)
@click.option(
    "--cluster-spread-ranking",
    is_flag=True,
    help="ClusterKV: rank clusters with their key spread as well as the centroid (spread_ranking).",
)
@click.option(
    "--subgen-t", type=int, default=4, show_default=True, help="SubGen key samples per cluster."
)
@click.option(
    "--subgen-s", type=int, default=256, show_default=True, help="SubGen value reservoir slots."
)
@click.option(
    "--subgen-sinks", type=int, default=4, show_default=True, help="SubGen exact first tokens."
)
@click.option(
    "--subgen-window", type=int, default=256, show_default=True, help="SubGen exact recent window."
)
@click.option(
    "--subgen-delta-rel",
    type=float,
    default=0.5,
    show_default=True,
    help="SubGen cluster radius as a fraction of the median key norm.",
)
@click.option(
    "--subgen-cluster-tokens",
    type=int,
    default=80,
    show_default=True,
    help="SubGen: bench keys are drawn around context / this many centres.",
)
@click.option(
    "--subgen-estimator",
    type=click.Choice(["sampled", "mean"]),
    default="sampled",
    show_default=True,
    help="SubGen estimator: the paper's sampling, or kvsurgery's cluster means.",
)
@click.option(
    "--subgen-max-clusters",
    type=int,
    default=None,
    help="SubGen clusters per kv head at most (required with --subgen-estimator mean).",
)
@click.option(
    "--repeats",
    type=int,
    default=None,
    help="Timed decode calls per cell (median taken; default GPU 200, CPU 5).",
)
@click.option(
    "--warmup", type=int, default=None, help="Untimed decode calls first (default GPU 20, CPU 1)."
)
@click.option("--no-graphs", is_flag=True, help="CUDA: skip the CUDA-graph replay timing.")
@click.option("--no-prefill", is_flag=True, help="Skip the prefill-side measurements.")
@click.option(
    "--prefill-batch",
    type=int,
    default=1,
    show_default=True,
    help="Batch size of the prefill measurements.",
)
@click.option(
    "--prefill-repeats",
    type=int,
    default=None,
    help="Timed prefill runs per cell (default GPU 3, CPU 1).",
)
@click.option(
    "--model",
    default=None,
    help="Model for end-to-end generate tokens/s (alias, folder, Hub id, .gguf; "
    "default: skip). smollm2-135m works offline once cached.",
)
@click.option(
    "--gen-context",
    type=int,
    default=None,
    help="Prompt tokens of the generate run (default GPU 4096, CPU 256).",
)
@click.option("--gen-tokens", type=int, default=32, show_default=True, help="New tokens generated.")
@click.option(
    "--gen-batch", type=int, default=1, show_default=True, help="Batch size of the generate run."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of all random inputs.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available).")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="torch CPU threads (default: torch's; 1 gives steadier numbers on a shared CPU).",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write every number with its settings, device and versions as JSON here.",
)
@click.option(
    "--plot",
    default=None,
    type=click.Path(dir_okay=False),
    help="Draw time vs context per method to this PNG (needs matplotlib).",
)
def bench_command(out, plot, no_graphs, no_prefill, **settings):
    """Time decode attention of each method vs dense SDPA (per layer, per context and
    batch), the prefill-side compression work, KV bytes per token, and optionally
    end-to-end generate tokens/s; prints tables last, --out writes JSON."""
    # every other option is a BenchConfig field of the same name
    cfg = BenchConfig(graphs=not no_graphs, prefill=not no_prefill, **settings)
    from .bench_methods import run_bench

    results = run_bench(cfg, out=out, plot=plot, log=lambda m: click.echo(m, err=True))
    click.echo(results_table(results))
