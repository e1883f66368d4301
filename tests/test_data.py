"""Calibration text: local files, the offline default, packing, and error messages."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvsurgery.data import DatasetSpec, builtin_documents, check_seq_len, iter_texts, pack_tokens
from kvsurgery.errors import KVSurgeryError


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_builtin_default_is_real_english_offline():
    docs = builtin_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    assert " the " in docs[0] and builtin_documents("reverse")[0] == docs[-1]


def test_local_txt_jsonl_parquet_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "beta"}) + "\n\n" + json.dumps({"body": "gamma"}) + "\n"
    )
    pq.write_table(pa.table({"body": ["delta", "epsilon"]}), tmp_path / "c.parquet")
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["alpha text"]
    spec = DatasetSpec(name=str(tmp_path / "b.jsonl"), column="body")
    assert list(iter_texts(spec)) == ["beta", "gamma"]
    spec = DatasetSpec(name=str(tmp_path / "c.parquet"), column="body")
    assert list(iter_texts(spec)) == ["delta", "epsilon"]
    sub = tmp_path / "only"
    sub.mkdir()
    (sub / "x.jsonl").write_text(json.dumps({"body": "one"}) + "\n")
    (sub / "y.txt").write_text("two")
    assert list(iter_texts(DatasetSpec(name=str(sub), column="body"))) == ["one", "two"]


def test_errors_name_the_problem(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "beta"}) + "\n")
    with pytest.raises(
        KVSurgeryError, match=r"no field 'text' \(fields: \['body'\]\).*--text-column"
    ):
        list(iter_texts(str(tmp_path / "b.jsonl")))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(KVSurgeryError, match=r"bad.jsonl:1 is not valid JSON"):
        list(iter_texts(str(tmp_path / "bad.jsonl")))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(KVSurgeryError, match=r"no column 'text' \(columns: \['body'\]\)"):
        list(iter_texts(str(tmp_path / "c.parquet")))
    with pytest.raises(KVSurgeryError, match="does not exist"):
        list(iter_texts("./missing.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KVSurgeryError, match="holds no"):
        list(iter_texts(str(tmp_path / "empty")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(KVSurgeryError, match="unsupported file type '.csv'"):
        list(iter_texts(DatasetSpec(name=str(tmp_path / "x.csv"))))


def test_hub_dataset_error_is_clear_offline():
    with pytest.raises(
        KVSurgeryError, match=r"could not load Hub dataset 'someone/no-such-dataset'.*network"
    ):
        list(iter_texts("someone/no-such-dataset"))


def test_hub_dataset_rows_are_read(monkeypatch):
    import datasets

    calls = {}

    def fake_load(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return [{"content": "first"}, {"content": ""}, {"content": "second"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = DatasetSpec(name="org/corpus", config="en", split="validation", column="content")
    assert list(iter_texts(spec)) == ["first", "second"]
    assert calls == {"name": "org/corpus", "config": "en", "split": "validation", "streaming": True}
    with pytest.raises(KVSurgeryError, match=r"no column 'text'"):
        list(iter_texts(DatasetSpec(name="org/corpus")))


def test_pack_tokens_shapes_and_limits(tok, tiny_llama_dir):
    from transformers import AutoConfig

    ids = pack_tokens(iter_texts(None), tok, 3, 50)
    assert ids.shape == (3, 50)
    again = pack_tokens(iter_texts(None), tok, 3, 50)
    assert (ids == again).all()
    with pytest.raises(KVSurgeryError, match=r"only \d+ tokens but 2 samples"):
        pack_tokens(["a few words"], tok, 2, 50)
    with pytest.raises(KVSurgeryError, match="--samples must be positive"):
        pack_tokens(["x"], tok, 0, 5)
    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    with pytest.raises(KVSurgeryError, match=r"--seq-len 4096 exceeds the model's maximum of 2048"):
        check_seq_len(4096, cfg)
