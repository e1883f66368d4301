"""Command line: thin wrappers that parse flags and call one library function each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import KVSurgeryError
from .recipes import METHODS

_MODEL_HELP = "Hub id, local folder, .gguf file or alias (default: smollm2-135m, works offline)."


# Commands defined in their own modules, imported only when invoked (they import torch).
_LAZY = {
    "eval": ("kvsurgery.evaluate", "eval_command"),
    "bench": ("kvsurgery.bench", "bench_command"),
}


class _Group(click.Group):
    """Print KVSurgeryError messages plainly (they name the problem and the fix); load the
    commands of ``_LAZY`` on first use."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx, name):
        if name in _LAZY and name not in self.commands:
            import importlib

            module, attr = _LAZY[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KVSurgeryError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="kvsurgery")
def main():
    """kvsurgery: calibrate, export and share checkpoints with a compressed KV cache."""


def _dataset_options(f):
    f = click.option(
        "--dataset",
        default=None,
        help="Hub dataset id, local txt/jsonl/parquet file or folder (default: built-in English text, offline).",
    )(f)
    f = click.option("--dataset-config", default=None, help="Hub dataset configuration name.")(f)
    f = click.option("--split", default="train", show_default=True, help="Hub dataset split.")(f)
    f = click.option(
        "--text-column",
        default="text",
        show_default=True,
        help="Column/field holding the text (Hub, jsonl, parquet).",
    )(f)
    f = click.option(
        "--no-streaming", is_flag=True, help="Download the Hub dataset instead of streaming it."
    )(f)
    return f


def _dataset_spec(dataset, dataset_config, split, text_column, no_streaming):
    from .data import DEFAULT_DATASET, DatasetSpec

    return DatasetSpec(
        name=dataset or DEFAULT_DATASET,
        config=dataset_config,
        split=split,
        column=text_column,
        streaming=not no_streaming,
    )


@main.command()
@click.option("--model", default=None, help=_MODEL_HELP)
@click.option(
    "--recipe",
    "recipes",
    multiple=True,
    help="Recipe YAML (repeatable), e.g. recipes/kvdict.yaml. None: capture and report only.",
)
@_dataset_options
@click.option(
    "--samples", type=int, default=None, help="Number of text windows (default 8, or the recipe's)."
)
@click.option(
    "--seq-len", type=int, default=None, help="Tokens per window (default 512, or the recipe's)."
)
@click.option(
    "--max-vectors", type=int, default=None, help="Reservoir size per layer (default 65536)."
)
@click.option("--seed", type=int, default=None, help="Seed of sampling and clustering (default 0).")
@click.option(
    "--set",
    "sets",
    multiple=True,
    help="Override a recipe field: --set n_atoms=512 (applies to every recipe that has it).",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Model dtype: auto, float32, bfloat16, float16.",
)
@click.option("--device-map", default=None, help='accelerate device map, e.g. "auto".')
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Calibration folder (resumes if it holds an interrupted run).",
)
def calibrate(
    model,
    recipes,
    dataset,
    dataset_config,
    split,
    text_column,
    no_streaming,
    samples,
    seq_len,
    max_vectors,
    seed,
    sets,
    dtype,
    device_map,
    out,
):
    """Capture post-RoPE K/V on sample text, report per-layer statistics, run method calibrators."""
    from .calibrate import calibrate as run
    from .recipes import apply_overrides, load_recipe, parse_set_options, resolve_calibration

    # Every recipe problem surfaces here, before any model is loaded.
    loaded = [load_recipe(r) for r in recipes]
    overrides = parse_set_options(list(sets))
    resolved = []
    for r in loaded:
        fields = {k: v for k, v in overrides.items() if hasattr(r.config, k)}
        resolved.append(apply_overrides(r, fields))
    unknown = [k for k in overrides if not any(hasattr(r.config, k) for r in loaded)]
    if unknown:
        raise KVSurgeryError(f"--set {unknown[0]}: no recipe given has that key.")
    settings = resolve_calibration(
        resolved, {"samples": samples, "seq_len": seq_len, "max_vectors": max_vectors, "seed": seed}
    )
    spec = _dataset_spec(dataset, dataset_config, split, text_column, no_streaming)
    manifest = run(
        model,
        out,
        recipes=resolved,
        dataset=spec,
        settings=settings,
        dtype=dtype,
        device_map=device_map,
    )
    report = Path(out) / "report.md"
    if report.is_file():
        click.echo(report.read_text())
    click.echo(f"calibration written to {out} (capture {manifest['capture']['seconds']} s)")


@main.command()
@click.option(
    "--calibration",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Calibration folder from `kvsurgery calibrate`.",
)
@click.option(
    "--method",
    default="kvdict",
    show_default=True,
    type=click.Choice(sorted(METHODS)),
    help="Compression method to export (its results must be in the calibration folder).",
)
@click.option("--out", required=True, type=click.Path(), help="Folder to write the checkpoint to.")
@click.option(
    "--model", default=None, help="Model to export (default: the one recorded in the calibration)."
)
@click.option("--dtype", default="auto", show_default=True, help="Dtype of the exported weights.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists (atomically).")
@click.option(
    "--eval-results",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Output folder of `kvsurgery eval` whose results.md table goes into the model card.",
)
def export(calibration, method, out, model, dtype, overwrite, eval_results):
    """Write a checkpoint that loads with from_pretrained(trust_remote_code=True), compressed."""
    from .export import export as run

    table = None
    if eval_results:
        md = Path(eval_results) / "results.md"
        if not md.is_file():
            raise KVSurgeryError(
                f"{eval_results} has no results.md; run `kvsurgery eval --out {eval_results}` first."
            )
        table = md.read_text()
    path = run(
        calibration,
        out,
        method=method,
        model=model,
        dtype=dtype,
        overwrite=overwrite,
        eval_table=table,
    )
    click.echo(f"exported {method} checkpoint to {path}")


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def inspect(folder):
    """Report what a checkpoint holds and whether it will load compressed."""
    from .export import inspect_checkpoint

    report = inspect_checkpoint(folder)
    click.echo(json.dumps(report, indent=2))
    if not report["loads_compressed"]:
        sys.exit(1)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--repo-id", required=True, help="Hub repository, org/name.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--token", default=None, help="Hub token (default: the logged-in one).")
def push(folder, repo_id, private, token):
    """Upload an exported checkpoint to the Hugging Face Hub."""
    from .export import push as run

    click.echo(run(folder, repo_id, private=private, token=token))


@main.command()
@click.option("--model", required=True, help="Exported checkpoint folder or Hub id.")
@click.option(
    "--prompt", default="The three most important ideas in computer science are", show_default=True
)
@click.option("--max-new-tokens", type=int, default=40, show_default=True)
def generate(model, prompt, max_new_tokens):
    """Generate greedily from an exported checkpoint with its compressed cache."""
    from .demo import generate_text

    click.echo(json.dumps(generate_text(model, prompt, max_new_tokens), indent=2))


@main.command()
@click.option("--model", default=None, help=_MODEL_HELP)
@click.option(
    "--out",
    default="runs/demo",
    show_default=True,
    type=click.Path(),
    help="Working folder (calibration, export).",
)
@click.option(
    "--recipe",
    default=None,
    help="KV-Dict recipe (default: recipes/kvdict.yaml, or the built-in defaults).",
)
@click.option("--samples", type=int, default=None, help="Text windows (default: the recipe's).")
@click.option(
    "--seq-len", type=int, default=None, help="Tokens per window (default: the recipe's)."
)
def demo(model, out, recipe, samples, seq_len):
    """End to end on one model: calibrate -> export -> from_pretrained in a fresh process -> generate."""
    from .demo import run_demo

    summary = run_demo(model, out, recipe=recipe, samples=samples, seq_len=seq_len)
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
