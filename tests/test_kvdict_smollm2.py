"""KV-Dict dictionary learning on real captured SmolLM2 keys and values."""

import pytest
import torch
from kvsurgery.kernels.omp import omp_ref, reconstruct

from kvsurgery.capture import capture_kv, load_layer
from kvsurgery.data import iter_texts, pack_tokens
from kvsurgery.dictlearn import learn_dictionary, query_key_maps, relative_error


@pytest.fixture(scope="module")
def captured(smollm2, tmp_path_factory):
    model, tok, _ = smollm2
    windows = pack_tokens(iter_texts(None), tok, 4, 384)  # 4608 vectors per layer, 4096 kept
    folder = tmp_path_factory.mktemp("cap")
    capture_kv(model, windows, folder, max_vectors=4096, seed=0, progress=False)
    return folder


def test_dictionary_learning_on_captured_smollm2_vectors(captured):
    cap = load_layer(captured, 12)
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


def test_query_metric_lowers_score_error_on_smollm2(captured):
    """Keys coded in their queries' metric (query_weighting 0.5) give held-out attention
    scores closer to the exact ones than keys coded as they are, at the same s and N."""
    cap = load_layer(captured, 20)
    keys, heads = cap["keys"], cap["heads"].long()
    kmap = query_key_maps(cap["queries"], cap["q_heads"], 3, 0.5)
    train = cap["samples"] < 3  # windows 0-2 train, window 3 is held out
    q_held = cap["queries"][cap["q_samples"] == 3]
    q_group = torch.div(cap["q_heads"][cap["q_samples"] == 3].long(), 3, rounding_mode="floor")

    def score_error(mapped: bool) -> float:
        x = torch.einsum("md,mde->me", keys, kmap[heads]) if mapped else keys
        D, _ = learn_dictionary(x[train], 256, 6, iters=4, seed=0)
        held = ~train
        x_hat = reconstruct(*omp_ref(x[held], D, 6), D)
        if mapped:
            x_hat = torch.einsum("md,mde->me", x_hat, torch.linalg.inv(kmap)[heads[held]])
        err = num = 0.0
        for h in range(3):
            q, sel = q_held[q_group == h], heads[held] == h
            err += float(((q @ (keys[held][sel] - x_hat[sel]).T) ** 2).sum())
            num += float(((q @ keys[held][sel].T) ** 2).sum())
        return err / num

    plain, mapped = score_error(False), score_error(True)
    assert mapped < 0.9 * plain, (mapped, plain)
