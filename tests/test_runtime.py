"""KV-Dict runtime on tiny models: lossless limit, padding, beams, chunks, crop, memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvsurgery.runtime import kvs_cache
from kvsurgery.runtime.kvs_attention import ATTN_NAME, install, install_kvdict
from kvsurgery.runtime.kvs_cache import CODE_BLOCK, KVDictLayer
from kvsurgery.runtime.kvs_layer import link_prompt_scores
from kvsurgery.runtime.kvs_methods import build_cache

HD = 16


def block(s, n_atoms=HD, coef="float32", layers=2, sinks=4, buffer=8, flush=4):
    return {
        "format_version": 1,
        "method": "kvdict",
        "layers": [{"s_k": s, "s_v": s, "n_atoms_k": n_atoms, "n_atoms_v": n_atoms}] * layers,
        "sinks": sinks,
        "buffer": buffer,
        "flush": flush,
        "omp_tol": None,
        "coef_dtype": coef,
    }


def random_dict(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(HD, n, generator=g), dim=0)


@pytest.fixture
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def compress(model, blk, dicts=None):
    dicts = dicts or {i: (torch.eye(HD), torch.eye(HD)) for i in range(2)}
    install_kvdict(model, blk, dicts)
    model.set_attn_implementation(ATTN_NAME)
    return model


def ids(b=2, t=40, seed=0):
    return torch.randint(3, 300, (b, t), generator=torch.Generator().manual_seed(seed))


def test_lossless_limit_generation_equals_dense(model):
    x = ids()
    dense = model.generate(x, max_new_tokens=24, do_sample=False)
    compress(model, block(HD))
    cache = build_cache(model)
    out = model.generate(x, max_new_tokens=24, do_sample=False, past_key_values=cache)
    assert torch.equal(out, dense)
    layer = cache.layers[0]
    assert isinstance(layer, KVDictLayer) and layer.n_comp > 40  # decoding really read codes
    assert cache.get_seq_length() == 40 + 23


def test_key_map_lossless_limit_equals_dense_and_changes_lossy_codes(model):
    """Keys stored as k W and read with q W⁻ᵀ: at s = d generation equals dense (left
    padding, GQA groups of 2), and at s < d the map changes the codes, so it is really used."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, HD, HD, generator=g)
    kmap = a @ a.transpose(1, 2) / HD + 0.3 * torch.eye(HD)  # SPD, condition ~ 10
    x = ids(2, 30)
    mask = torch.ones_like(x)
    x[0, :5], mask[0, :5] = 2, 0
    dense = model.generate(x, attention_mask=mask, max_new_tokens=16, do_sample=False)

    def run(s, with_map):
        blk = {**block(s), "key_map": with_map}
        tensors = {
            i: {"kvsurgery_dk": torch.eye(HD), "kvsurgery_dv": torch.eye(HD)}
            | ({"kvsurgery_kmap": kmap} if with_map else {})
            for i in range(2)
        }
        install(model, blk, tensors)
        model.set_attn_implementation(ATTN_NAME)
        cache = build_cache(model)
        out = model.generate(
            x, attention_mask=mask, max_new_tokens=16, do_sample=False, past_key_values=cache
        )
        return out, cache.layers[0]

    out, layer = run(HD, True)
    assert torch.equal(out, dense) and layer.kmap is not None and layer.n_comp > 20
    _, plain = run(4, False)
    assert plain.kmap is None and not hasattr(model.model.layers[0].self_attn, "kvsurgery_kmap")
    _, mapped = run(4, True)
    assert not torch.equal(plain.k_idx[:, :, : plain.n_comp], mapped.k_idx[:, :, : mapped.n_comp])
    assert torch.equal(plain.v_idx[:, :, : plain.n_comp], mapped.v_idx[:, :, : mapped.n_comp])


def test_diagonal_key_map_is_read_as_a_scale_with_the_matrix_maths(model):
    """Calibration writes diagonal maps: the layer gets them as (H_kv, d) scales, and keys and
    queries come out as with the (H_kv, d, d) matrices."""
    g = torch.Generator().manual_seed(5)
    w = torch.rand(2, HD, generator=g) + 0.5
    tensors = {
        i: {"kvsurgery_dk": torch.eye(HD), "kvsurgery_dv": torch.eye(HD)}
        | {"kvsurgery_kmap": torch.diag_embed(w)}
        for i in range(2)
    }
    install(model, {**block(6), "key_map": True}, tensors)
    layer = build_cache(model).layers[0]
    assert layer.kmap.shape == (2, HD) and layer.qmap.shape == (2, HD)
    full = KVDictLayer(None, None, None, None, 6, 6, kmap=torch.diag_embed(w),
                       qmap=torch.diag_embed(1 / w))  # fmt: skip
    k, q = torch.randn(3, 2, 7, HD, generator=g), torch.randn(3, 4, 2, HD, generator=g)
    torch.testing.assert_close(layer._map_keys(k), full._map_keys(k))
    torch.testing.assert_close(layer._map_query(q), full._map_query(q))
    torch.testing.assert_close(layer._map_query(q)[:, 1], q[:, 1] / w[0])  # GQA: head 1 -> kv 0


def test_gram_matrices_only_off_cpu_and_once_per_device(model):
    """OMP on CPU reads atoms (omp_cpu), so a CPU model holds no DᵀD; elsewhere it is
    computed once per device the dictionaries are on, and dropped when they are reloaded."""
    dicts = {i: (random_dict(40, i), random_dict(40, 10 + i)) for i in range(2)}
    compress(model, block(4, n_atoms=40), dicts)
    layer = build_cache(model).layers[0]
    assert layer.gram_k is None and layer.gram_v is None
    mod = model._kvsurgery_state["modules"][0]
    mod._kvs_gram_k = torch.eye(40)
    compress(model, block(4, n_atoms=40), dicts)  # reloading drops what was cached
    assert mod._kvs_gram_k is None
    mod.to("meta")  # stands in for an accelerator: the dictionaries move, the Gram follows
    g = kvs_cache._gram(mod, "k")
    assert g.device.type == "meta" and g.shape == (40, 40)
    assert kvs_cache._gram(mod, "k") is g
    mod._kvs_gram_k = torch.eye(40)  # cached before a move: recomputed where D now is
    assert kvs_cache._gram(mod, "k").device.type == "meta"


def test_left_padding_batch_equals_dense(model):
    x = ids(2, 30)
    mask = torch.ones_like(x)
    x[0, :7], mask[0, :7] = 2, 0  # row 0 left-padded
    dense = model.generate(x, attention_mask=mask, max_new_tokens=16, do_sample=False)
    compress(model, block(HD))
    out = model.generate(
        x,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        past_key_values=build_cache(model),
    )
    assert torch.equal(out, dense)
    # and each row alone gives its own continuation: padding really is masked
    solo = model.generate(
        x[1:], max_new_tokens=16, do_sample=False, past_key_values=build_cache(model)
    )
    assert torch.equal(solo[0], out[1])


def test_beam_search_equals_dense(model):
    x = ids(1, 36, seed=3)
    dense = model.generate(x, max_new_tokens=12, num_beams=3, do_sample=False)
    compress(model, block(HD))
    out = model.generate(
        x, max_new_tokens=12, num_beams=3, do_sample=False, past_key_values=build_cache(model)
    )
    assert torch.equal(out, dense)


def test_chunked_prefill_and_teacher_forcing_match_dense(model):
    x = ids(1, 60, seed=5)
    with torch.no_grad():
        ref = model(x).logits
    compress(model, block(HD))
    cache = build_cache(model)
    with torch.no_grad():
        a = model(x[:, :30], past_key_values=cache).logits
        b = model(x[:, 30:50], past_key_values=cache).logits  # multi-token step over codes
        c = torch.cat(
            [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(50, 60)], 1
        )
    torch.testing.assert_close(torch.cat([a, b, c], 1), ref, atol=2e-5, rtol=1e-4)


def test_compression_degrades_gracefully_as_s_falls(model):
    x = ids(1, 80, seed=7)
    with torch.no_grad():
        ref = model(x).logits[0, 40:].log_softmax(-1)
    dicts = {i: (random_dict(64, i), random_dict(64, 10 + i)) for i in range(2)}
    errs = []
    for s in (16, 8, 4, 1):
        compress(model, block(s, n_atoms=64, coef="float8_e4m3fn"), dicts)
        cache = build_cache(model)
        with torch.no_grad():
            model(x[:, :40], past_key_values=cache)
            lp = torch.cat(
                [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(40, 80)], 1
            )
        errs.append(float((lp[0].log_softmax(-1) - ref).abs().mean()))
    assert errs[0] < errs[1] < errs[2] < errs[3], errs
    assert errs[0] < 0.05 * errs[3] + 1e-3 or errs[0] < 1e-2, errs


def test_crop_and_reorder(model):
    compress(model, block(HD))
    x = ids(2, 50, seed=2)
    full, short = build_cache(model), build_cache(model)
    with torch.no_grad():
        model(x, past_key_values=full)
        model(x[:, :47], past_key_values=short)
    full.crop(-3)
    assert full.get_seq_length() == 47
    with torch.no_grad():
        a = model(x[:, 47:48], past_key_values=full).logits
        b = model(x[:, 47:48], past_key_values=short).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    full.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(full.layers[0].sink_k[0], short.layers[0].sink_k[1])


def test_memory_is_what_the_format_promises(model):
    s = 5
    compress(
        model,
        block(s, n_atoms=64, coef="float8_e4m3fn", buffer=8, flush=4),
        {i: (random_dict(64, i), random_dict(64, i)) for i in range(2)},
    )
    cache = build_cache(model)
    t = 600
    with torch.no_grad():
        model(ids(1, t), past_key_values=cache)
    layer = cache.layers[0]
    n_c = t - 4 - 8
    assert layer.n_comp == n_c
    b, h = 1, 2
    exact = (4 + 8) * 2 * b * h * HD * 4  # sinks + buffer, K and V, fp32 model
    cap = -(-n_c // CODE_BLOCK) * CODE_BLOCK
    codes = b * h * cap * 2 * s * (2 + 1)  # K and V: int16 index + 1-byte coefficient
    assert layer.nbytes() == exact + codes
    assert layer.k_coef.dtype == torch.float8_e4m3fn and layer.k_idx.dtype == torch.int16
    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids(1, t), past_key_values=dense)
    dense_bytes = sum(x.keys.untyped_storage().nbytes() * 2 for x in dense.layers)
    assert cache.nbytes() < 0.35 * dense_bytes


def test_sdpa_or_explicit_dense_cache_turns_compression_off(model):
    x = ids(1, 40)
    dense = model.generate(x, max_new_tokens=10, do_sample=False)
    compress(
        model,
        block(1, n_atoms=64, coef="float8_e4m3fn"),
        {i: (random_dict(64, i), random_dict(64, i)) for i in range(2)},
    )
    out = model.generate(
        x, max_new_tokens=10, do_sample=False, past_key_values=DynamicCache(config=model.config)
    )
    assert torch.equal(out, dense)


def test_gemma2_softcapping_lossless_limit_equals_eager(tiny_dirs):
    """Gemma2 caps attention logits: the compressed path (decode over codes, dense prefill and
    sliding layers without SDPA) must cap them too, or greedy tokens drift."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dirs("gemma2"), attn_implementation="eager"
    ).eval()
    assert model.config.attn_logit_softcapping
    model.config.attn_logit_softcapping = 2.0
    with torch.no_grad():  # random weights give scores near 0: make them large enough to cap
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    x = ids(b=2, t=40)
    dense = model.generate(x, max_new_tokens=16, do_sample=False)
    d, n = model.config.head_dim, model.config.num_hidden_layers
    blk = block(d, n_atoms=d, layers=n)
    install_kvdict(model, blk, {i: (torch.eye(d), torch.eye(d)) for i in range(n)})
    model.set_attn_implementation(ATTN_NAME)
    cache = build_cache(model)
    out = model.generate(x, max_new_tokens=16, do_sample=False, past_key_values=cache)
    assert torch.equal(out, dense)
    assert any(getattr(layer, "n_comp", 0) > 0 for layer in cache.layers)  # codes were read


# -- protected tokens ----------------------------------------------------------------------
def protecting(blk, protect, window=8, pool=3, dtype=None):
    out = {**blk, "protect": protect, "protect_window": window, "protect_pool": pool}
    return out if dtype is None else {**out, "protect_dtype": dtype}


def test_protecting_every_encoded_token_equals_dense(model):
    """Lossless limit with lossy codes (1 random atom, fp8): when every encoded prompt token
    is protected, attention reads them exactly and the logits equal dense ones (batch 2,
    left padding, teacher forcing); protecting 3 leaves the codes' error. Later flushes
    protect nothing."""
    x = ids(2, 40, seed=11)
    mask = torch.ones_like(x)
    x[0, :6], mask[0, :6] = 2, 0
    with torch.no_grad():
        ref = model(x, attention_mask=mask).logits[:, 30:]
    dicts = {i: (random_dict(64, i), random_dict(64, 10 + i)) for i in range(2)}
    lossy = block(1, n_atoms=64, coef="float8_e4m3fn", flush=16)  # no flush after the prompt
    for protect, exact in ((40, True), (3, False)):
        compress(model, protecting(lossy, protect), dicts)
        cache = build_cache(model)
        with torch.no_grad():
            model(x[:, :30], attention_mask=mask[:, :30], past_key_values=cache)
            layer = cache.layers[0]
            assert layer.n_comp == 0 and layer.buf_k.shape[2] == 26  # waits for the scores
            out = torch.cat(
                [
                    model(
                        x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache
                    ).logits
                    for t in range(30, 40)
                ],
                1,
            )
        assert layer.n_comp == 30 - 4 - 8  # the prompt was encoded at the first step
        if exact:
            torch.testing.assert_close(out[1], ref[1], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=1e-4)
            # positions 4..21 were encoded; row 0's padding among them (4, 5) is never kept
            assert layer.kept_pos[0].tolist() == [-1, -1, *range(6, 22)]
            assert layer.kept_pos[1].tolist() == list(range(4, 22))
        else:
            assert layer.kept_pos.shape == (2, 3)
            assert not torch.allclose(out, ref, atol=1e-2, rtol=1e-2)


def test_protected_tokens_are_where_the_last_prompt_queries_look():
    """A key planted where the prompt's last queries look is kept exact with its pooled
    neighbours in every layer (chosen once, in position order, never padding) while its
    code is masked; a crop into the codes drops the protected tokens it removes."""
    from kvsurgery.runtime import kvs_cache

    g = torch.Generator().manual_seed(21)
    B, H, H_kv, T, d = 2, 4, 2, 60, HD
    k = torch.randn(B, H_kv, T, d, generator=g)
    v = torch.randn(B, H_kv, T, d, generator=g)
    q = torch.randn(B, H, T, d, generator=g) * 0.1
    planted = 25
    k[:, :, planted] = 0.0
    k[:, 1, planted, 0] = 40.0  # kv head 1 only, read by query heads 2 and 3
    q[:, 2:, -8:, 0] = 1.0
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, :10] = False
    mask = (torch.ones(T, T, dtype=torch.bool).tril()[None] & pad[:, None, :])[:, None]
    eye = torch.eye(d)
    layers = [
        KVDictLayer(eye, eye, eye, eye, 2, 2, sinks=2, buffer=6, flush=4, coef_dtype="float32",
                    protect=5, protect_window=8, protect_pool=3)
        for _ in range(2)
    ]  # fmt: skip
    link_prompt_scores(layers)
    assert layers[0].scores is layers[1].scores
    scale = d**-0.5
    for layer in layers:
        layer.update(k[:, :, :-1], v[:, :, :-1])
        layer.observe(q[:, :, :-1], k[:, :, :-1], mask[:, :, :-1, :-1], scale)
    for layer in layers:
        layer.update(k[:, :, -1:], v[:, :, -1:])
        layer.attend(q[:, :, -1:], mask[:, :, -1:], scale)
        pos = layer.kept_pos
        assert pos.shape == (B, 5) and (pos[:, 1:] > pos[:, :-1]).all()
        for b in range(B):
            assert {planted - 1, planted, planted + 1} <= set(pos[b].tolist())
            assert all(pad[b, p] for p in pos[b].tolist())
        idx = pos[:, None, :, None].expand(B, H_kv, 5, d)
        assert torch.equal(layer.kept_k, k.gather(2, idx)) and torch.equal(
            layer.kept_v, v.gather(2, idx)
        )
        assert layer.n_comp == T - 1 - 2 - 6  # the prompt past the buffer was coded too
    before = layers[0].kept_pos.clone()
    for _ in range(6):  # later flushes protect nothing new
        layers[0].update(k[:, :, -1:], v[:, :, -1:])
        layers[0].attend(q[:, :, -1:], None, scale)
    assert torch.equal(layers[0].kept_pos, before)
    layers[1].crop(-(7 + T - 3 - planted))  # buffer, then codes down to position `planted`
    assert (layers[1].kept_pos < 2 + layers[1].n_comp).all()
    assert (layers[1].kept_pos[:, -2:] == -1).all()  # planted and planted + 1 dropped
    layers[0].reset()
    assert layers[0].scores.total is None
    with pytest.raises(ValueError, match="protect must be >= 0"):
        KVDictLayer(eye, eye, eye, eye, 2, 2, protect=-1)
    with pytest.raises(ValueError, match=r"config.kvsurgery.protect_pool must be an int >= 1"):
        kvs_cache.validate(protecting(block(2), 2, pool=0), 2)
    with pytest.raises(
        ValueError, match=r"protect_dtype must be one of \['model', 'int8', 'int4'\]"
    ):
        kvs_cache.validate(protecting(block(2), 2, dtype="int2"), 2)
    with pytest.raises(ValueError, match="protect_dtype must be one of"):
        KVDictLayer(eye, eye, eye, eye, 2, 2, protect=1, protect_dtype="fp8")


@pytest.mark.parametrize("dtype", [None, "int8", "int4"])
def test_protected_tokens_count_in_measured_memory(model, dtype):
    compress(
        model,
        protecting(block(5, n_atoms=64, coef="float8_e4m3fn"), 16, dtype=dtype),
        {i: (random_dict(64, i), random_dict(64, i)) for i in range(2)},
    )
    cache = build_cache(model)
    t = 300
    with torch.no_grad():
        model(ids(1, t), past_key_values=cache)
        model(ids(1, 1), past_key_values=cache)
    layer = cache.layers[0]
    n_c = t - 4 - 8  # what the prefill would have encoded without protection
    assert layer.n_comp == n_c and layer.kept_pos.shape == (1, 16)
    exact = (4 + 9) * 2 * 2 * HD * 4 + 16 * 8  # sinks, buffer (fp32) + positions
    # kept K and V, 2 kv heads: fp32; int8 with one fp32 scale per token and head; int4
    # (two per byte) with an fp32 step and minimum for the one 16-channel group
    per_vector = {None: HD * 4, "int8": HD + 4, "int4": HD // 2 + 2 * 4}[dtype]
    kept = 16 * 2 * 2 * per_vector
    codes = 2 * -(-n_c // CODE_BLOCK) * CODE_BLOCK * 2 * 5 * 3
    assert layer.nbytes() == exact + kept + codes
    stored = {None: torch.float32, "int8": torch.int8, "int4": torch.uint8}[dtype]
    assert layer.kept_k.dtype == stored


def test_int8_round_trip_against_stored_scales():
    """The int8 values round-trip against their stored scales."""
    from kvsurgery.runtime.kvs_cache import dequantize_int8, quantize_int8

    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 5, HD, generator=g, dtype=torch.float64).to(torch.bfloat16)
    v[0, 0] = 0.0  # an all-zero vector keeps a zero scale and reads back as zeros
    q, scale = quantize_int8(v)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (3, 5, 1)
    back = dequantize_int8(q, scale)
    assert back.dtype == torch.bfloat16 and torch.equal(back[0, 0], v[0, 0])
    # half an int8 step, plus the bf16 rounding of what is read back
    bound = 0.5 * scale.float() * 1.01 + v.float().abs() * 2**-8
    assert ((back.float() - v.float()).abs() <= bound).all()
    rel = (back.float() - v.float()).norm(dim=-1) / v.float().norm(dim=-1).clamp_min(1e-9)
    assert float(rel[:, 1:].max()) < 0.02


@pytest.mark.parametrize("d, group", [(64, 32), (128, 32), (80, 16), (16, 16), (6, 2)])
def test_int4_round_trip_packs_two_channels_per_byte(d, group):
    """Codes are rounded against the stored (bf16) step and minimum: every channel reads
    back within half a step (plus bf16 rounding); a constant group reads back as its value;
    channel 2i sits in the low nibble of byte i; odd head dims are refused clearly."""
    from kvsurgery.runtime.kvs_cache import dequantize_int4, int4_group, quantize_int4

    assert int4_group(d) == group
    g = torch.Generator().manual_seed(d)
    v = torch.randn(3, 5, d, generator=g, dtype=torch.float64).to(torch.bfloat16)
    v[0, 0] = 0.0
    v[0, 1, :group] = 1.5  # one constant group
    packed, params = quantize_int4(v)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, d // 2)
    assert params.dtype == torch.bfloat16 and params.shape == (3, 5, 2 * d // group)
    back = dequantize_int4(packed, params)
    assert back.dtype == torch.bfloat16 and back.shape == v.shape
    assert torch.equal(back[0, 0], v[0, 0]) and torch.equal(back[0, 1, :group], v[0, 1, :group])
    step = params.float().view(3, 5, d // group, 2)[..., 0].repeat_interleave(group, -1)
    bound = 0.5 * step * 1.01 + v.float().abs() * 2**-7
    assert ((back.float() - v.float()).abs() <= bound).all()
    # nibble order as documented: the code of channel 2i (from what it reads back) is the
    # low nibble of byte i, that of channel 2i + 1 the high one
    lo = params.float().view(3, 5, d // group, 2)[..., 1].repeat_interleave(group, -1)
    codes = ((back.float() - lo) / step.clamp_min(1e-30)).round()
    codes = torch.where(step > 0, codes, 0).to(torch.uint8)
    assert torch.equal(packed & 15, codes[..., 0::2]) and torch.equal(packed >> 4, codes[..., 1::2])
    with pytest.raises(ValueError, match="even head_dim, got 7; use protect_dtype int8"):
        quantize_int4(torch.zeros(2, 7))


@pytest.mark.parametrize("dtype, bound", [("int8", 0.01), ("int4", 0.03)])
def test_quantized_protected_tokens_read_back_close(model, dtype, bound):
    """Protecting every encoded prompt token (codes: one random atom, fp8) in int8 or int4
    gives logits within that rounding of dense ones, far closer than the codes' (3
    protected)."""
    x = ids(2, 40, seed=11)
    with torch.no_grad():
        ref = model(x).logits[:, 30:]
    dicts = {i: (random_dict(64, i), random_dict(64, 10 + i)) for i in range(2)}
    lossy = block(1, n_atoms=64, coef="float8_e4m3fn", flush=16)
    err = {}
    for protect in (40, 3):
        compress(model, protecting(lossy, protect, dtype=dtype), dicts)
        cache = build_cache(model)
        with torch.no_grad():
            model(x[:, :30], past_key_values=cache)
            out = torch.cat(
                [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(30, 40)], 1
            )
        err[protect] = float((out - ref).norm() / ref.norm())
    assert err[40] < bound and err[40] < err[3] / 5, err


TRAINING_FREE = {
    "clusterkv": {"budget": 12, "sinks": 2, "window": 4, "tokens_per_cluster": 3},
    "subgen": {"estimator": "mean", "protect": 0.5, "sinks": 2, "window": 4},
}


@pytest.mark.parametrize("method", ["kvdict", "clusterkv", "subgen"])
def test_compressed_caches_work_with_autograd_enabled(model, method):
    """A plain forward (no ``torch.no_grad``, as in a training loop or a user's own code)
    through a compressed cache (KV-Dict and SubGen protecting tokens) gives the logits it
    gives under no_grad, and the prefill's gradient still reaches the weights."""
    from kvsurgery.export import apply_default
    from kvsurgery.recipes import recipe_from_dict

    x = ids(1, 40, seed=5)
    if method == "kvdict":
        dicts = {i: (random_dict(64, i), random_dict(64, 10 + i)) for i in range(2)}
        compress(model, protecting(block(2, n_atoms=64), 6), dicts)
    else:
        recipe = recipe_from_dict({"method": method, **TRAINING_FREE[method]})
        apply_default(model, method, recipe)
        model.set_attn_implementation(ATTN_NAME)
    outs = []
    for grad in (False, True):
        cache = build_cache(model)
        with torch.set_grad_enabled(grad):
            first = model(x[:, :30], past_key_values=cache).logits
            steps = [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(30, 34)]
        if grad:
            first[0, -1].sum().backward()
            assert model.model.layers[0].self_attn.k_proj.weight.grad is not None
        outs.append(torch.cat([first, *steps], 1).detach())
        assert cache.layers[0].n_comp > 0  # the steps read a compressed past
    torch.testing.assert_close(outs[1], outs[0])
