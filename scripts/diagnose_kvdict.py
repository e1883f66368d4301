"""Which part of a KV-Dict cache costs quality: swap exact keys or values back in, then eval.

The KV-Dict layers run as usual (prefill, buffer, OMP codes), and also keep an exact copy of
every token they encode. Attention then reads, for the compressed tokens, the codes'
reconstruction (fp32 dense attention, the torch reference's maths) except where this
script puts the exact vectors back:

    --exact keys            exact keys for every compressed token, values from codes
    --exact values          exact values, keys from codes
    --exact both            exact keys and values (the full cache's attention, a check)
    --layers 17-19          only in these layers (with --exact)
    --top-residual 0.05     exact keys for the 5% of tokens (per layer and head) whose key
                            codes have the largest relative error
    --key-blend 0.5         keys = exact + 0.5 * (code - exact): how much key error retrieval
                            tolerates (1 = as shipped, 0 = exact)
    --key-sign-residual     add the key residual quantized to one bit per channel with one
                            scale per token (mean |residual|): what ~d/8 more bytes would buy
    --mass oracle           rescale, per query, the softmax mass of the compressed tokens to
                            what their exact keys give (a perfect per-query mass correction)
    --logit-shift -0.5      add this constant to every compressed token's logit (SmolLM2 4k:
                            better on the eval text, worse on a held-out one; see README)
    --logit-shrink 0.5      compressed tokens' logits l -> mu + 0.5 (l - mu), mu their mean
                            per query: damps the codes' logit noise (did not help pass keys)

Protected tokens (recipe ``protect``) are read as the shipped attention reads them (exact,
or int8 with ``protect_dtype: int8``); the options above apply to the coded tokens only.

Everything after ``--`` goes to ``kvsurgery eval`` (its bytes/token column counts the
codes, not the diagnostic copies). Example (SmolLM2, needle at 4k)::

    python scripts/diagnose_kvdict.py --exact keys --layers 17-19 -- \\
        --calibration cal --methods kvdict --tasks needle --context 4k --dtype bfloat16

A diagnostic: it holds twice the memory and decodes densely, never ship it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from kvsurgery.kernels.kvdict_attention import dense_attention_fp32, kvdict_reconstruct

from kvsurgery.cli import main as kvsurgery_main
from kvsurgery.runtime import kvs_cache


def _layer_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes A-B or A, got {text!r}") from None


def _biased_attention(q, k, v, exact_k, start, n, scale, mask, oracle, shift, shrink):
    """fp32 GQA attention whose compressed columns ``start:start+n`` get their logits shrunk
    towards their mean and a bias. ``mask`` ``(B, Q, L)`` bool."""
    B, H, Q, d = q.shape
    H_kv, L = k.shape[1], k.shape[2]
    g = H // H_kv
    qg = q.float().reshape(B, H_kv, g * Q, d)
    s = ((qg @ k.transpose(-1, -2)) * scale).view(B, H_kv, g, Q, L)
    m = mask[:, None, None]
    comp, cm = s[..., start : start + n], m[..., start : start + n]
    if shrink != 1.0:
        mu = (comp * cm).sum(-1, keepdim=True) / cm.sum(-1, keepdim=True).clamp_min(1)
        comp = mu + shrink * (comp - mu)
    if oracle:
        se = ((qg @ exact_k.transpose(-1, -2)) * scale).view(B, H_kv, g, Q, n)
        se, c = se.masked_fill(~cm, float("-inf")), comp.masked_fill(~cm, float("-inf"))
        bias = (se.logsumexp(-1, keepdim=True) - c.logsumexp(-1, keepdim=True)).nan_to_num(0.0)
        comp = comp + bias
    s = torch.cat([s[..., :start], comp + shift, s[..., start + n :]], -1)
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p.view(B, H_kv, g * Q, L) @ v).view(B, H, Q, d)


def install(
    exact: str | None,
    layers: tuple[int, int] | None,
    top: float,
    blend: float = 1.0,
    sign_residual: bool = False,
    mass: str | None = None,
    shift: float = 0.0,
    shrink: float = 1.0,
) -> None:
    """Patch :class:`kvs_cache.KVDictLayer` in this process (see the module doc)."""
    append_codes, make_layer = kvs_cache.KVDictLayer._append_codes, kvs_cache.make_layer

    def _append_codes(self, k, v):
        if self.n_comp == 0:
            self.exact_k, self.exact_v = k[:, :, :0], v[:, :, :0]
            self.key_err = k.new_zeros(*k.shape[:2], 0, dtype=torch.float32)
        n0 = self.n_comp
        append_codes(self, k, v)
        k_hat = kvdict_reconstruct(
            self.dk, self.k_idx[:, :, n0 : self.n_comp], self.k_coef[:, :, n0 : self.n_comp]
        )
        err = (k_hat - k.float()).norm(dim=-1) / k.float().norm(dim=-1).clamp_min(1e-6)
        # [:n0]: copies of tokens a crop removed are dropped
        self.exact_k = torch.cat([self.exact_k[:, :, :n0], k], 2)
        self.exact_v = torch.cat([self.exact_v[:, :, :n0], v], 2)
        self.key_err = torch.cat([self.key_err[:, :, :n0], err], 2)

    def attend(self, query, attention_mask, scaling, softcap=None):
        if softcap is not None:
            raise SystemExit("diagnose_kvdict.py does not handle softcapped models")
        b, _, q_len, _ = query.shape
        m = self._valid_mask(attention_mask, q_len, b, query.device)
        if self.protect > 0 and not self._chosen:
            self._flush_prompt(m)
        n_s, n = self.sink_k.shape[2], self.n_comp
        # as the shipped attention: protected tokens read exactly, not from their codes
        coded = self._coded_mask(m)
        mask = torch.cat([m[:, :, :n_s], self._kept_mask(m), coded, m[:, :, n_s + n :]], -1)
        k_c = kvdict_reconstruct(self.dk, self.k_idx[:, :, :n], self.k_coef[:, :, :n])
        v_c = kvdict_reconstruct(self.dv, self.v_idx[:, :, :n], self.v_coef[:, :, :n])
        exact_k, exact_v = self.exact_k[:, :, :n].float(), self.exact_v[:, :, :n].float()
        if n and self._diag_on:
            if exact in ("keys", "both"):
                k_c = exact_k
            if exact in ("values", "both"):
                v_c = exact_v
        if n and self._diag_on and sign_residual:
            res = exact_k - k_c
            k_c = k_c + res.sign() * res.abs().mean(-1, keepdim=True)
        if n and self._diag_on and blend != 1.0:
            k_c = exact_k + blend * (k_c - exact_k)
        if n and top > 0:
            err = self.key_err[:, :, :n]
            worst = err >= torch.quantile(err, 1 - top, dim=-1, keepdim=True)
            k_c = torch.where(worst[..., None], exact_k, k_c)
        kept_k, kept_v = self.kept_tokens()
        k = torch.cat([self.sink_k.float(), kept_k.float(), k_c, self.buf_k.float()], 2)
        v = torch.cat([self.sink_v.float(), kept_v.float(), v_c, self.buf_v.float()], 2)
        q = self._map_query(query)
        if n and self._diag_on and (mass or shift or shrink != 1.0):
            out = _biased_attention(
                q,
                k,
                v,
                exact_k,
                n_s + self.kept_k.shape[2],
                n,
                scaling,
                mask,
                oracle=mass == "oracle",
                shift=shift,
                shrink=shrink,
            )
        else:
            out = dense_attention_fp32(q, k, v, scaling, mask)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    def tagged_make_layer(mod, spec, block):
        layer = make_layer(mod, spec, block)
        i = getattr(mod, "layer_idx", 0)
        layer._diag_on = layers is None or layers[0] <= i <= layers[1]
        return layer

    kvs_cache.KVDictLayer._append_codes = _append_codes
    kvs_cache.KVDictLayer.attend = attend
    kvs_cache.make_layer = tagged_make_layer


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exact", choices=("keys", "values", "both"))
    ap.add_argument(
        "--layers", type=_layer_range, help="A-B: layers --exact and the key options apply to"
    )
    ap.add_argument("--top-residual", type=float, default=0.0)
    ap.add_argument("--key-blend", type=float, default=1.0)
    ap.add_argument("--key-sign-residual", action="store_true")
    ap.add_argument("--mass", choices=("oracle",))
    ap.add_argument("--logit-shift", type=float, default=0.0)
    ap.add_argument("--logit-shrink", type=float, default=1.0)
    args = ap.parse_args(ours)
    if not 0.0 <= args.top_residual < 1.0:
        ap.error("--top-residual must be in [0, 1)")
    if not rest:
        ap.error("give the kvsurgery eval arguments after --")
    install(
        args.exact,
        args.layers,
        args.top_residual,
        args.key_blend,
        args.key_sign_residual,
        args.mass,
        args.logit_shift,
        args.logit_shrink,
    )
    sys.argv = ["kvsurgery", "eval", *rest]
    kvsurgery_main()


if __name__ == "__main__":
    main()
