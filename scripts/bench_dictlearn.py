#!/usr/bin/env python
"""Held-out relative error per wall-clock second: MOD learners vs the published Adam recipe.

All learners start from the same dictionary (same seed) and get the same training-time
budget (``--seconds``; evaluation on the held-out vectors is not counted):

* ``mod (ours)``: :func:`kvsurgery.dictlearn.learn_dictionary` (mini-batch MOD passes;
  the batch doubles whenever progress stalls),
* ``mod full-batch``: the same function with a single batch, i.e. plain MOD,
* ``adam``: :func:`kvsurgery.dictlearn.learn_dictionary_adam`, the published recipe
  (lr 1e-4, cosine decay, 20 epochs; it may finish before the budget).

The table gives each method's final held-out error and its error at the time both ``mod``
and ``adam`` had run for, plus how long ``mod`` took to reach Adam's final error.

Examples::

    python scripts/bench_dictlearn.py --synthetic --seconds 30
    python scripts/bench_dictlearn.py --vectors calib/capture/layer_005.safetensors \\
        --tensor keys --atoms 1024 --s 8 --seconds 120 --out bench_layer5_keys.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from kvsurgery.dictlearn import learn_dictionary, learn_dictionary_adam, make_sparse_data


def _load(args) -> tuple[torch.Tensor, str]:
    if args.vectors:
        from safetensors.torch import load_file

        tensors = load_file(args.vectors)
        # Capture checkpoints store their reservoirs as kv_keys / kv_values.
        name = args.tensor if args.tensor in tensors else f"kv_{args.tensor}"
        if name not in tensors:
            sys.exit(f"{args.vectors} has no tensor {args.tensor!r}; it has {sorted(tensors)}")
        x = tensors[name].float()
        return x.reshape(-1, x.shape[-1]), f"{args.vectors}:{name}"
    x, _ = make_sparse_data(
        args.train + args.heldout,
        args.dim,
        args.atoms,
        args.s,
        noise=args.noise,
        seed=args.seed + 100,
    )
    what = (
        f"synthetic: {args.s}-sparse over a hidden {args.dim}x{args.atoms} dictionary, "
        f"noise {args.noise}"
    )
    return x, what


def _err_at(history: list[dict], t: float) -> float:
    """Held-out error of the last dictionary produced within t training seconds."""
    return [h for h in history if h["seconds"] <= t + 1e-9][-1]["heldout_rel_err"]


def _time_to(history: list[dict], err: float) -> float | None:
    hit = [h["seconds"] for h in history if h["heldout_rel_err"] <= err]
    return hit[0] if hit else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--vectors", help="safetensors file with an (M, d) tensor")
    src.add_argument("--synthetic", action="store_true", help="synthetic sparse data (default)")
    p.add_argument(
        "--tensor", default="keys", help="tensor name in --vectors, or kv_NAME (default: keys)"
    )
    p.add_argument("--atoms", type=int, default=256, help="dictionary size N")
    p.add_argument("--s", type=int, default=8, help="atoms per vector")
    p.add_argument("--seconds", type=float, default=30.0, help="training-time budget per method")
    p.add_argument("--heldout", type=int, default=4000, help="held-out vectors")
    p.add_argument("--train", type=int, default=20000, help="training vectors (at most)")
    p.add_argument("--dim", type=int, default=64, help="synthetic: vector dimension")
    p.add_argument("--noise", type=float, default=0.05, help="synthetic: relative noise")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam: peak learning rate")
    p.add_argument("--epochs", type=int, default=20, help="Adam: epochs (cosine schedule length)")
    p.add_argument("--batch-size", type=int, default=1024, help="Adam: vectors per step")
    p.add_argument(
        "--no-full-mod",
        dest="full_mod",
        action="store_false",
        help="skip the plain full-batch MOD row",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data split and initialisation")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="write the histories and summary as JSON here")
    return p


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    x, what = _load(args)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    x = x[perm]
    if x.shape[0] <= args.heldout:
        sys.exit(f"need more than --heldout={args.heldout} vectors, got {x.shape[0]}")
    held, train = x[: args.heldout], x[args.heldout : args.heldout + args.train]
    print(f"data: {what}")
    print(f"train {tuple(train.shape)}, held-out {tuple(held.shape)}, device {device}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"N={args.atoms} atoms, s={args.s}, budget {args.seconds:g} s of training per method")

    def budget(entry, D):
        return entry["seconds"] >= args.seconds

    common = dict(seed=args.seed, holdout=held, callback=budget, device=device)
    hists = {}
    _, hists["mod"] = learn_dictionary(train, args.atoms, args.s, iters=10**6, **common)
    if args.full_mod:
        _, hists["mod-full"] = learn_dictionary(
            train, args.atoms, args.s, iters=10**6, batch_size=10**12, **common
        )
    per_epoch = -(-train.shape[0] // args.batch_size)
    _, hists["adam"] = learn_dictionary_adam(
        train, args.atoms, args.s, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        eval_every=max(1, per_epoch // 4), **common,
    )  # fmt: skip
    h_mod, h_adam = hists["mod"], hists["adam"]

    t_eq = min(h_mod[-1]["seconds"], h_adam[-1]["seconds"])
    names = {"mod": "mod (ours)", "mod-full": "mod full-batch", "adam": f"adam lr={args.lr:g}"}
    rows = []
    for key, hist in hists.items():
        last = hist[-1]
        rows.append(
            {
                "method": names[key],
                "updates": last["iter"] if key == "adam" else sum(h["batches"] for h in hist),
                "passes": last["epoch"] if key == "adam" else last["iter"],
                "seconds": last["seconds"],
                "initial_heldout_rel_err": hist[0]["heldout_rel_err"],
                "heldout_rel_err": last["heldout_rel_err"],
                "err_at_equal_time": _err_at(hist, t_eq),
            }
        )
    reach = _time_to(h_mod, h_adam[-1]["heldout_rel_err"])

    print()
    head = f"err @ {t_eq:.1f} s"
    print(f"{'method':<16} {'updates':>8} {'passes':>7} {'seconds':>8} {'held-out rel err':>17} {head:>14}")  # fmt: skip
    for r in rows:
        print(
            f"{r['method']:<16} {r['updates']:>8} {r['passes']:>7.1f} {r['seconds']:>8.1f} "
            f"{r['heldout_rel_err']:>17.4f} {r['err_at_equal_time']:>14.4f}"
        )
    print(f"initial dictionary (all): held-out rel err {rows[0]['initial_heldout_rel_err']:.4f}")
    if reach is not None:
        print(
            f"mod reached adam's final error ({h_adam[-1]['heldout_rel_err']:.4f}) after "
            f"{reach:.2f} s; adam took {h_adam[-1]['seconds']:.1f} s"
        )
    result = {
        "config": vars(args),
        "data": what,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "equal_time_seconds": t_eq,
        "mod_seconds_to_adam_final_err": reach,
        "summary": rows,
        "history": hists,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
