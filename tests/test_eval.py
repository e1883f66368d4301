"""`kvsurgery eval` on tiny models: every metric and baseline, exactness checks against the
dense model, resume, the Hub task with a fake dataset, error messages, the command."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvsurgery import evaluate as ev
from kvsurgery import tasks
from kvsurgery.baselines import (
    SinkWindowCache,
    SinkWindowLayer,
    cache_nbytes,
    full,
    quantized,
    quantized_unavailable,
    sink_window,
)
from kvsurgery.data import builtin_documents, pack_tokens
from kvsurgery.errors import KVSurgeryError
from kvsurgery.runtime.kvs_attention import install_kvdict

HD = 16
FAST = {"ppl_tokens": 24, "progress": False}
RECIPE = {"method": "kvdict", "n_atoms": 64, "s_k": 4, "s_v": 4, "iters": 3}
RECIPE |= {"sinks": 2, "buffer": 8, "flush": 4}


def load_tiny(folder):
    from kvsurgery.models import load_model

    return load_model(str(folder))


@pytest.fixture(scope="module")
def calibration(tiny_llama_dir, tmp_path_factory):
    from kvsurgery.calibrate import calibrate
    from kvsurgery.recipes import CalibrationConfig, recipe_from_dict

    out = tmp_path_factory.mktemp("eval-cal")
    calibrate(
        None,
        out,
        recipes=[recipe_from_dict(RECIPE)],
        settings=CalibrationConfig(samples=4, seq_len=64),
        loaded=load_tiny(tiny_llama_dir),
        progress=False,
    )
    return out


FAKE_ROWS = [
    {
        "question": "What does the yield statement do ?",
        "context": " ".join(builtin_documents("reverse")[0].split()[:150]),
        "answers": {"text": ["the yield", "yield expression"], "answer_start": [0, 5]},
    },
    {
        "question": "Which object is returned ?",
        "context": "A new object is returned .",
        "answers": ["object"],
    },
    {"question": "Skipped : no answer", "context": "text", "answers": []},
    {"question": "What is a class ?", "context": "A class is a type .", "answers": "type"},
]


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def load_dataset(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split))
        return iter(FAKE_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.fixture(scope="module")
def full_run(tiny_llama_dir, calibration, tmp_path_factory):
    """Default methods (KV-Dict from a real calibration + every baseline), every task."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setattr(datasets, "load_dataset", lambda *a, **k: iter(FAKE_ROWS))
    out = tmp_path_factory.mktemp("eval-full")
    try:
        res = ev.run_eval(
            load_tiny(tiny_llama_dir),
            calibration=calibration,
            tasks="ppl,passkey,needle,hub:fake/qa::validation",
            contexts="64,128",
            out_dir=out,
            hub_limit=3,
            hub_max_new_tokens=4,
            **FAST,
        )
    finally:
        mp.undo()
    return res, out


# -- tasks (pure) -------------------------------------------------------------------------
def test_qa_scores():
    assert tasks.normalize_answer("  The Yield,  statement! ") == "yield statement"
    assert tasks.exact_match("the Object.", ["an object"]) == 1.0
    assert tasks.exact_match("objects", "object") == 0.0
    assert tasks.f1_score("a new object", "object") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert tasks.f1_score("nothing here", ["object", "nothing"]) == pytest.approx(2 / 3)
    assert tasks.f1_score("", "object") == 0.0
    assert tasks.answers_of({"text": ["a", " "], "answer_start": [0, 1]}) == ["a"]
    assert tasks.answers_of(7) == ["7"]
    assert tasks.first_line(" yes\nno") == "yes"
    assert tasks.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert tasks.passkey_score(" 12345. The", "12345") == 1.0
    assert tasks.passkey_score(" 1234 5", "12345") == 0.0
    assert tasks.needle_score(" Lantern, of course", "lantern") == 1.0
    assert tasks.needle_score(" lanterns", "lantern") == 0.0


@pytest.mark.parametrize("length", [90, 113, 300])
def test_prompts_fit_length_and_place_the_fact(tiny_llama_dir, length):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    depths = []
    for depth in (0.1, 0.5, 0.9):
        p = tasks.passkey_prompt(tok, length, depth, seed=3)
        n = len(tok(p.context)["input_ids"]) + len(
            tok(p.question, add_special_tokens=False)["input_ids"]
        )
        assert n == p.n_tokens <= length and n > length - 25
        assert p.answer in p.context and len(p.answer) == 5
        depths.append(p.actual_depth)
        q = tasks.needle_prompt(tok, length, depth, seed=3)
        assert f"code word for {q.meta['city']} is {q.answer}" in q.context
        assert q.n_tokens <= length
    assert depths == sorted(depths) and depths[-1] - depths[0] > (0.5 if length > 200 else 0.1)
    again = tasks.passkey_prompt(tok, length, 0.9, seed=3)
    assert again.context == p.context and again.answer == p.answer  # seeded
    assert tasks.passkey_prompt(tok, length, 0.9, seed=4).answer != p.answer
    with pytest.raises(ValueError, match="cannot hold"):
        tasks.passkey_prompt(tok, 10, 0.5)


# -- baselines ----------------------------------------------------------------------------
def test_sink_window_layer_keeps_ends_and_reports_consistent_masks():
    layer = SinkWindowLayer(n_sink=2, window=3)
    k = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 4).contiguous()
    out, _ = layer.update(k, k.clone())
    assert out.shape[2] == 10  # prefill attends densely over the whole prompt
    assert layer.keys[0, 0, :, 0].tolist() == [0, 1, 7, 8, 9]
    assert layer.get_seq_length() == 10
    assert layer.get_mask_sizes(2) == (5 + 2, 10 - 5)  # held + query, held sit right before it
    out, _ = layer.update(k[:, :, :2] + 100, k[:, :, :2])
    assert out.shape[2] == 7 and layer.keys[0, 0, :, 0].tolist() == [0, 1, 9, 100, 101]
    assert layer.nbytes() == 2 * 5 * 2 * 4 * 4  # exactly what is held: the big tensor was freed
    with pytest.raises(KVSurgeryError, match="batch size 1"):
        SinkWindowLayer().update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))


def test_sink_window_refuses_padding_and_matches_dense_when_window_is_large(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    x = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    dense = model.generate(x, max_new_tokens=8, do_sample=False)
    cache = sink_window(4, 64)(model)
    assert isinstance(cache, SinkWindowCache)
    out = model.generate(x, max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert torch.equal(out, dense)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with pytest.raises(KVSurgeryError, match="padding"):
        model(x, attention_mask=mask, past_key_values=sink_window(4, 8)(model))
    # A small window really drops tokens: a chunk after prefill sees sinks + window + itself,
    # which a dense forward reproduces with the same 4D mask.
    small = sink_window(2, 6)(model)
    with torch.no_grad():
        model(x[:, :20], past_key_values=small)
        got = model(x[:, 20:23], past_key_values=small).logits
        mask = torch.ones(23, 23).tril().bool()
        mask[20:, 2:14] = False
        ref = model(x[:, :23], attention_mask=mask[None, None]).logits[:, 20:]
    assert small.layers[0].held() == 8 and small.get_seq_length() == 23
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_quantized_cache_memory_is_measured(tiny_llama_dir, backend):
    reason = quantized_unavailable(backend, 4)
    if reason:
        assert backend in reason  # unavailable backends say why (and eval reports it)
        with pytest.raises(KVSurgeryError, match=backend):
            quantized(4, backend)
        return
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    x = torch.randint(3, 300, (1, 300), generator=torch.Generator().manual_seed(1))
    sizes = {}
    for name, builder in [
        ("full", full()),
        ("q4", quantized(4, backend, q_group_size=16)),
        ("q2", quantized(2, backend, q_group_size=16)),
    ]:
        cache = builder(model)
        with torch.no_grad():
            model(x[:, :260], past_key_values=cache)
            for t in range(260, 300):
                model(x[:, t : t + 1], past_key_values=cache)
        sizes[name] = cache_nbytes(cache)
    assert sizes["full"] == 2 * 2 * 2 * 300 * HD * 4  # layers, K+V, heads, tokens, d, fp32
    assert 0 < sizes["q2"] < sizes["q4"] < 0.5 * sizes["full"]


def test_unknown_quantized_backend_is_a_reason():
    assert "unknown quantization backend" in quantized_unavailable("nope", 4)


# -- measurements -------------------------------------------------------------------------
def test_full_cache_perplexity_equals_dense_forward(tiny_llama_dir, tmp_path):
    model, tok, info = load_tiny(tiny_llama_dir)
    ctx, n = 96, 40
    res = ev.run_eval(
        (model, tok, info),
        methods="full",
        tasks="ppl",
        contexts=[ctx],
        out_dir=tmp_path,
        ppl_tokens=n,
        progress=False,
    )
    ids = pack_tokens(builtin_documents("reverse"), tok, 1, ctx + n + 1)
    with torch.no_grad():
        logits = model(ids).logits[0, ctx : ctx + n].float()
    nll = -torch.log_softmax(logits, -1).gather(1, ids[0, ctx + 1 : ctx + n + 1, None]).squeeze(1)
    dense_ppl = math.exp(float(nll.double().mean()))
    got = res["cells"][0]["metrics"]["perplexity"]
    assert got == pytest.approx(dense_ppl, rel=1e-4)
    assert res["cells"][0]["kv_tokens"] == ctx + n
    assert res["cells"][0]["kv_bytes"] == 2 * 2 * 2 * (ctx + n) * HD * 4


def test_perplexity_over_several_texts_is_the_dense_mean_over_disjoint_windows(
    tiny_llama_dir, tmp_path
):
    model, tok, info = load_tiny(tiny_llama_dir)
    ctx, n, texts = 48, 16, 3
    common = dict(methods="full", tasks="ppl", contexts=[ctx], ppl_tokens=n, progress=False)
    one = ev.run_eval((model, tok, info), out_dir=tmp_path / "one", **common)
    res = ev.run_eval((model, tok, info), out_dir=tmp_path / "three", ppl_texts=texts, **common)
    length = ctx + n + 1
    ids = pack_tokens(builtin_documents("reverse"), tok, texts, length)  # consecutive windows
    with torch.no_grad():
        logits = model(ids).logits[:, ctx : ctx + n].float()
    nll = -torch.log_softmax(logits, -1).gather(2, ids[:, ctx + 1 :, None]).squeeze(2).double()
    metrics = res["cells"][0]["metrics"]
    assert metrics["tokens_scored"] == texts * n
    assert metrics["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-4)
    per_text = [math.exp(float(x)) for x in nll.mean(1)]
    assert metrics["perplexity_per_text"] == pytest.approx(per_text, rel=1e-4)
    assert len(set(round(p, 3) for p in per_text)) == texts  # really different texts
    # the first window is the one a single-text run scores
    assert one["cells"][0]["metrics"]["perplexity"] == pytest.approx(per_text[0], rel=1e-6)
    assert "perplexity_per_text" not in one["cells"][0]["metrics"]
    assert "on each of 3 disjoint texts" in ev.results_markdown(res)
    assert "disjoint" not in ev.results_markdown(one)
    with pytest.raises(KVSurgeryError, match="ppl_texts must be >= 1"):
        ev.EvalConfig(ppl_texts=0)


def test_lossless_limit_and_large_window_reproduce_full(tiny_llama_dir, tmp_path):
    model, tok, info = load_tiny(tiny_llama_dir)
    block = {
        "format_version": 1,
        "method": "kvdict",
        "layers": [{"s_k": HD, "s_v": HD, "n_atoms_k": HD, "n_atoms_v": HD}] * 2,
        "sinks": 2,
        "buffer": 8,
        "flush": 4,
        "omp_tol": None,
        "coef_dtype": "float32",
    }
    install_kvdict(model, block, {i: (torch.eye(HD), torch.eye(HD)) for i in range(2)})
    res = ev.run_eval(
        (model, tok, info),
        methods="full,kvdict,sink_window:4096",
        tasks="ppl,passkey,needle",
        contexts="100",
        out_dir=tmp_path,
        **FAST,
    )
    cells = {(c["method"], c["task"]): c for c in res["cells"]}
    ref = cells[("full", "ppl")]["metrics"]["perplexity"]
    for m in ("kvdict", "sink_window:4096"):
        assert cells[(m, "ppl")]["metrics"]["perplexity"] == pytest.approx(ref, rel=1e-4)
        for t in ("passkey", "needle"):
            preds = [e["prediction"] for e in cells[(m, t)]["metrics"]["examples"]]
            assert preds == [e["prediction"] for e in cells[("full", t)]["metrics"]["examples"]]
    assert cells[("kvdict", "ppl")]["compressed_tokens"] > 0  # the prefix was read from codes
    assert cells[("kvdict", "ppl")]["compressed_tokens"] >= 100 - 2 - 8


# -- the whole run ------------------------------------------------------------------------
def test_eval_runs_every_metric_and_baseline(full_run):
    res, out = full_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cells"] == json.loads(json.dumps(res["cells"]))
    assert (
        on_disk["seed"] == 0
        and on_disk["versions"]["torch"]
        and on_disk["settings"]["ppl_tokens"] == 24
    )
    # KV-Dict from the calibration, every training-free method, then the baselines, with
    # one memory-matched sink_window per compressed method
    free = [m for m in ev._compressed_methods() if ev._training_free(m)]
    compressed = ["kvdict", *free]
    methods = [*compressed, "full", *[f"sink_window@{m}" for m in compressed]]
    methods += ["quantized-int4", "quantized-int2"]
    assert list(on_disk["methods"]) == methods
    md = (out / "results.md").read_text()
    assert (
        "| method | context | KV bytes/token | % of fp16 | perplexity | ppl ratio vs full |" in md
    )
    rows = {(r["method"], r["context"]): r for r in res["table"]}
    for ctx in (64, 128):
        for m in methods:
            r = rows[(m, ctx)]
            if "skipped" in r:  # a quantized backend that does not work here says why
                assert m.startswith("quantized") and r["skipped"]
                assert f"{m} at {ctx}: skipped" in md
                continue
            assert r["kv_bytes_per_token"] > 0 and math.isfinite(r["perplexity"])
            assert 0 <= r["passkey"] <= 1 and 0 <= r["needle"] <= 1
            assert set(r["hub:fake/qa::validation"]) == {"em", "f1"}
        assert rows[("full", ctx)]["kv_ratio_fp16"] == pytest.approx(2.0)  # fp32 model
        assert rows[("full", ctx)]["ppl_ratio_vs_full"] == 1.0
        # sink_window is given the memory KV-Dict measured at this context
        for m in compressed:
            kv, sw = rows[(m, ctx)], rows[(f"sink_window@{m}", ctx)]
            budget = res["kv_state"][m].get("token_budget")
            if budget:  # reads a token budget per step: the window reads as many
                assert sw["window"] == budget - 4
            else:  # the window is given the memory the method measured (at most all tokens)
                want = min(kv["kv_bytes_per_token"], rows[("full", ctx)]["kv_bytes_per_token"])
                assert sw["kv_bytes_per_token"] == pytest.approx(want, rel=0.05)
    kv_cells = [c for c in res["cells"] if c["method"] == "kvdict"]
    assert all(c["compressed_tokens"] > 0 for c in kv_cells)
    assert rows[("kvdict", 128)]["kv_ratio_fp16"] < 1.0
    # every cell records its settings
    c = next(c for c in res["cells"] if c["method"] == "sink_window@kvdict")
    assert c["params"]["matched_to"] == "kvdict" and c["params"]["window"] >= 1
    assert len((out / ev.CELLS).read_text().splitlines()) == len(res["cells"])


def test_hub_task_scores_a_fake_dataset(full_run):
    res, _ = full_run
    hub = [c for c in res["cells"] if c["task"].startswith("hub:")]
    assert hub
    for c in hub:
        ex = c["metrics"]["examples"]
        assert len(ex) == 3 and c["metrics"]["n"] == 3  # the row without an answer is left out
        assert ex[0]["answers"] == ["the yield", "yield expression"] and ex[2]["answers"] == [
            "type"
        ]
        for e in ex:
            assert e["em"] == tasks.exact_match(e["prediction"], e["answers"])
            assert e["f1"] == tasks.f1_score(e["prediction"], e["answers"])
            assert e["prompt_tokens"] <= c["context"] - 4
        assert c["metrics"]["f1"] == pytest.approx(sum(e["f1"] for e in ex) / 3)


def test_hub_task_arguments_and_missing_column(tiny_llama_dir, tmp_path, fake_hub):
    loaded = load_tiny(tiny_llama_dir)
    ev.run_eval(
        loaded,
        methods="full",
        tasks="hub:org/qa:cfg:dev",
        contexts="96",
        out_dir=tmp_path,
        hub_limit=1,
        hub_max_new_tokens=2,
        **FAST,
    )
    assert fake_hub == [("org/qa", "cfg", "dev")]
    with pytest.raises(KVSurgeryError, match="no column 'query'"):
        ev.run_eval(
            loaded,
            methods="full",
            tasks="hub:org/qa",
            contexts="96",
            out_dir=tmp_path / "b",
            hub_question_col="query",
            **FAST,
        )


def test_resume_skips_finished_cells(tiny_llama_dir, calibration, tmp_path, monkeypatch):
    args = dict(methods="full,sink_window:16", tasks="ppl", out_dir=tmp_path, **FAST)
    kv_args = dict(calibration=calibration, methods="kvdict,sink_window", tasks="ppl", **FAST)
    kv_first = ev.run_eval(
        load_tiny(tiny_llama_dir), out_dir=tmp_path / "kv", contexts="64", **kv_args
    )
    loaded = load_tiny(tiny_llama_dir)
    first = ev.run_eval(loaded, contexts="64", **args)
    ran = []
    real = ev._Run.run_cell

    def counting(self, method, builder, task, context):
        ran.append((method.name, task.name, context))
        return real(self, method, builder, task, context)

    monkeypatch.setattr(ev._Run, "run_cell", counting)
    again = ev.run_eval(loaded, contexts="64", **args)
    assert ran == [] and again["cells"] == first["cells"]
    # a calibration applied again (a fresh load, a new KV-Dict block) is the same setting
    kv_again = ev.run_eval(
        load_tiny(tiny_llama_dir), out_dir=tmp_path / "kv", contexts="64", **kv_args
    )
    assert ran == [] and kv_again["cells"] == kv_first["cells"]
    more = ev.run_eval(loaded, contexts="64,80", **args)
    assert ran == [("full", "ppl", 80), ("sink_window:16", "ppl", 80)]
    assert len(more["cells"]) == 4
    # a changed setting reruns the cells it affects, and only those
    ev.run_eval(loaded, contexts="64", **{**args, "trials": 2, "depths": [0.3]})
    assert ran == [("full", "ppl", 80), ("sink_window:16", "ppl", 80)]
    ran.clear()
    ev.run_eval(loaded, contexts="64", **{**args, "ppl_tokens": 12})
    assert len(ran) == 2
    ran.clear()
    ev.run_eval(loaded, contexts="64", **{**args, "ppl_texts": 2})
    assert len(ran) == 2
    ran.clear()
    ev.run_eval(loaded, contexts="64", **args)  # ppl_texts 1 is the setting of older cells
    assert ran == []


# -- errors and the command ---------------------------------------------------------------
def test_error_messages(tiny_llama_dir, tmp_path):
    with pytest.raises(KVSurgeryError, match="unknown method 'h2o'"):
        ev.parse_method("h2o")
    with pytest.raises(KVSurgeryError, match="quantized baselines are int2 or int4"):
        ev.parse_method("quantized-int3")
    with pytest.raises(KVSurgeryError, match="unknown backend 'gptq'"):
        ev.parse_method("quantized-int4-gptq")
    with pytest.raises(KVSurgeryError, match="unknown task 'mmlu'"):
        ev.parse_task("mmlu")
    with pytest.raises(KVSurgeryError, match=r"hub:<dataset>\[:config\[:split\]\]"):
        ev.parse_task("hub:")
    with pytest.raises(KVSurgeryError, match="bad context '2m'"):
        ev.parse_contexts("2k,2m")
    with pytest.raises(KVSurgeryError, match="bad context '0'"):
        ev.parse_contexts("0")
    assert ev.parse_contexts("2k, 4K,512") == [2048, 4096, 512]
    assert ev.parse_task("hub:org/ds") == ev.TaskSpec("hub:org/ds", "hub", "org/ds", None, "test")
    loaded = load_tiny(tiny_llama_dir)
    with pytest.raises(KVSurgeryError, match="needs a model that carries its state"):
        ev.run_eval(loaded, methods="kvdict", tasks="ppl", contexts="64", out_dir=tmp_path)
    with pytest.raises(KVSurgeryError, match="give a window, e.g. sink_window:512"):
        ev.run_eval(
            loaded, methods="full,sink_window", tasks="ppl", contexts="64", out_dir=tmp_path
        )
    with pytest.raises(KVSurgeryError, match="use a longer context"):
        ev.run_eval(
            loaded, methods="full", tasks="passkey", contexts="20", out_dir=tmp_path, **FAST
        )


def test_command(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    args = [
        "--model",
        str(tiny_llama_dir),
        "--methods",
        "full,sink_window:16",
        "--tasks",
        "ppl,passkey",
    ]
    args += [
        "--context",
        "64",
        "--ppl-tokens",
        "8",
        "--ppl-texts",
        "2",
        "--depths",
        "0.5",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    res = runner.invoke(ev.eval_command, args)
    assert res.exit_code == 0, res.output
    assert "| sink_window:16 (W=16) | 64 |" in res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["settings"]["depths"] == [0.5] and data["contexts"] == [64]
    assert data["settings"]["ppl_texts"] == 2
    ppl = next(c for c in data["cells"] if c["task"] == "ppl")
    assert ppl["metrics"]["tokens_scored"] == 16
    bad = runner.invoke(ev.eval_command, ["--context", "2k,x", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "bad context 'x'" in bad.output
    helps = [p.help for p in ev.eval_command.params]
    assert all(helps), "every flag has a help line"


def test_exported_checkpoint_evaluates_like_the_calibration(
    tiny_llama_dir, calibration, full_run, tmp_path
):
    from kvsurgery.export import export

    folder = export(calibration, tmp_path / "export", loaded=load_tiny(tiny_llama_dir))
    res = ev.run_eval(
        str(folder), tasks="ppl", methods="kvdict", contexts="64", out_dir=tmp_path / "ev", **FAST
    )
    assert res["model"]["kind"] == "export"
    got = res["cells"][0]
    ref = next(c for c in full_run[0]["cells"] if c["id"] == "kvdict|ppl|64")
    assert got["compressed_tokens"] == ref["compressed_tokens"] > 0
    assert got["metrics"]["perplexity"] == pytest.approx(ref["metrics"]["perplexity"], rel=1e-5)
    assert got["kv_bytes"] == ref["kv_bytes"]


@pytest.mark.slow
def test_smollm2_full_cache_retrieves_and_baselines_cost_less(smollm2, tmp_path):
    res = ev.run_eval(
        smollm2,
        methods="full,sink_window:64",
        tasks="ppl,passkey",
        contexts="1k",
        out_dir=tmp_path,
        ppl_tokens=32,
        progress=False,
    )
    rows = {r["method"]: r for r in res["table"]}
    assert rows["full"]["passkey"] >= 2 / 3
    assert rows["sink_window:64"]["passkey"] <= rows["full"]["passkey"]
    assert rows["sink_window:64"]["kv_bytes_per_token"] < 0.2 * rows["full"]["kv_bytes_per_token"]
    assert rows["sink_window:64"]["perplexity"] > rows["full"]["perplexity"]


def test_question_in_prompt_prefills_the_question(tiny_llama_dir, tmp_path, monkeypatch):
    """--question-in-prompt: context and question (but its last token) in one prefill; a
    setting of its own, so its cells do not reuse the default protocol's."""
    seen = []
    real = ev.greedy_answer

    def recording(model, cache, context_ids, question_ids, max_new, eos=()):
        seen.append((len(context_ids), len(question_ids)))
        return real(model, cache, context_ids, question_ids, max_new, eos)

    monkeypatch.setattr(ev, "greedy_answer", recording)
    loaded = load_tiny(tiny_llama_dir)
    args = dict(methods="full", tasks="passkey", contexts="96", depths=[0.5], out_dir=tmp_path)
    first = ev.run_eval(loaded, progress=False, **args)
    ((ctx_len, q_len),) = seen
    assert q_len > 1 and "prefilled prompt" not in ev.results_markdown(first)
    seen.clear()
    res = ev.run_eval(loaded, progress=False, question_in_prompt=True, **args)
    assert seen == [(ctx_len + q_len - 1, 1)]  # a cell of its own: ran again
    assert res["settings"]["question_in_prompt"] is True
    assert "question at the end of the prefilled prompt" in ev.results_markdown(res)
    # the full cache is exact either way: same answer
    assert (
        res["cells"][0]["metrics"]["examples"][0]["prediction"]
        == (first["cells"][0]["metrics"]["examples"][0]["prediction"])
    )


def test_half_precision_perplexity_is_flagged_as_noisy(full_run):
    """Perplexity in bf16/fp16 moves by ~1% with the order of equivalent sums: the table
    says so (and points at float32) there, and only there."""
    res, _ = full_run
    assert res["dtype"] == "torch.float32"
    assert "rounding noise" not in ev.results_markdown(res)
    half = {**res, "dtype": "torch.bfloat16"}
    assert "Perplexity in bfloat16 carries rounding noise" in ev.results_markdown(half)
    assert "--dtype float32" in ev.results_markdown(half)
    no_ppl = {
        **half,
        "table": [{k: v for k, v in r.items() if k != "perplexity"} for r in res["table"]],
    }
    assert "rounding noise" not in ev.results_markdown(no_ppl)


def _diagnose_script(monkeypatch):
    """scripts/diagnose_kvdict.py as a module; its patches are undone after the test."""
    import importlib.util
    from pathlib import Path

    from kvsurgery.runtime import kvs_cache

    for name in ("_append_codes", "attend"):
        monkeypatch.setattr(kvs_cache.KVDictLayer, name, getattr(kvs_cache.KVDictLayer, name))
    monkeypatch.setattr(kvs_cache, "make_layer", kvs_cache.make_layer)
    path = Path(__file__).parents[1] / "scripts" / "diagnose_kvdict.py"
    spec = importlib.util.spec_from_file_location("diagnose_kvdict", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("protect, dtype", [(0, "model"), (6, "model"), (6, "int8")])
def test_diagnose_script_reads_codes_like_the_cache_and_exact_vectors_like_full(
    tiny_llama_dir, tmp_path, monkeypatch, protect, dtype
):
    """The diagnostic's own attention (with protected tokens read as the cache reads them)
    gives the shipped cache's perplexity; with every coded token's exact key and value put
    back, the full cache's (to int8 rounding where protected tokens are int8)."""
    from kvsurgery.calibrate import calibrate
    from kvsurgery.recipes import CalibrationConfig, recipe_from_dict

    cal = tmp_path / "cal"
    recipe = recipe_from_dict(
        {**RECIPE, "s_k": 1, "s_v": 1, "protect": protect, "protect_dtype": dtype}
    )
    calibrate(
        None,
        cal,
        recipes=[recipe],
        settings=CalibrationConfig(samples=4, seq_len=64),
        loaded=load_tiny(tiny_llama_dir),
        progress=False,
    )

    def ppl(out, methods="kvdict"):
        res = ev.run_eval(
            load_tiny(tiny_llama_dir), calibration=cal, methods=methods, tasks="ppl",
            contexts=[64], out_dir=tmp_path / out, **FAST,
        )  # fmt: skip
        return {c["method"]: c["metrics"]["perplexity"] for c in res["cells"]}

    shipped = ppl("shipped", "kvdict,full")
    diag = _diagnose_script(monkeypatch)
    diag.install(None, None, 0.0)
    assert ppl("codes")["kvdict"] == pytest.approx(shipped["kvdict"], rel=1e-3)
    diag.install("both", None, 0.0)
    assert ppl("both")["kvdict"] == pytest.approx(
        shipped["full"], rel=1e-4 if dtype == "model" else 2e-3
    )
    assert abs(shipped["kvdict"] / shipped["full"] - 1) > 3e-3  # the codes are lossy here
