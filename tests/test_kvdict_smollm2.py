"""KV-Dict dictionary learning on real captured SmolLM2 keys and values."""

import torch
from kvsurgery.kernels.omp import omp_ref, reconstruct

from kvsurgery.capture import capture_kv, load_layer
from kvsurgery.data import iter_texts, pack_tokens
from kvsurgery.dictlearn import learn_dictionary, relative_error


def test_dictionary_learning_on_captured_smollm2_vectors(smollm2, tmp_path):
    model, tok, _ = smollm2
    windows = pack_tokens(iter_texts(None), tok, 4, 384)  # 4608 vectors per layer, 4096 kept
    capture_kv(
        model, windows, tmp_path, max_vectors=4096, seed=0, capture_queries=False, progress=False
    )
    cap = load_layer(tmp_path, 12)
    for name in ("keys", "values"):
        x = cap[name]
        train, held = x[:3200], x[3200:]
        D, hist = learn_dictionary(train, 256, 6, iters=4, seed=0, holdout=held)
        errs = [h["heldout_rel_err"] for h in hist]
        assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), (name, errs)
        rand = torch.nn.functional.normalize(
            torch.randn(D.shape, generator=torch.Generator().manual_seed(0)), dim=0
        )
        err_rand = relative_error(held, reconstruct(*omp_ref(held, rand, 6), rand))
        err_learned = relative_error(held, reconstruct(*omp_ref(held, D, 6), D))
        assert err_learned < 0.8 * err_rand, (name, err_learned, err_rand)
