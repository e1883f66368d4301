"""Calibration and evaluation text: Hub datasets, local files, and an offline default.

The offline default is the English prose of the Python language reference that every
CPython installation ships (``pydoc_data.topics``): real text on any machine, with no
network, and nothing of it is stored in this repository.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import KVSurgeryError

DEFAULT_DATASET = "builtin:python-docs"
_LOCAL_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


@dataclass
class DatasetSpec:
    """What text to read. ``name`` is a Hub dataset id, a local file/folder, or the default."""

    name: str = DEFAULT_DATASET
    config: str | None = None
    split: str = "train"
    column: str = "text"
    streaming: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def builtin_documents(order: str = "forward") -> list[str]:
    """The offline default corpus, one document per reference topic, in a fixed order.

    ``order="reverse"`` gives the same documents back to front, so evaluation can read text
    far from what calibration read first.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some minimal Python builds strip it
        raise KVSurgeryError(
            "the built-in calibration text (Python's pydoc_data.topics) is missing from this "
            "Python installation; pass --dataset with a local .txt/.jsonl/.parquet file or a "
            "Hub dataset name."
        ) from e
    docs = [topics[k] for k in sorted(topics)]
    return docs[::-1] if order == "reverse" else docs


def _iter_local_file(path: Path, column: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        yield path.read_text(encoding="utf-8", errors="replace")
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise KVSurgeryError(
                        f"{path}:{n} is not valid JSON ({e.msg}); a .jsonl file holds one JSON "
                        "object per line."
                    ) from e
                if not isinstance(row, dict) or column not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise KVSurgeryError(
                        f"{path}:{n} has no field {column!r} (fields: {keys}); choose the text "
                        "field with --text-column."
                    )
                yield str(row[column])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if column not in table.column_names:
            raise KVSurgeryError(
                f"{path} has no column {column!r} (columns: {table.column_names}); choose it with "
                "--text-column."
            )
        yield from (str(t) for t in table.column(column).to_pylist() if t)
    else:
        raise KVSurgeryError(
            f"{path}: unsupported file type {suffix!r}; use one of {', '.join(_LOCAL_SUFFIXES)}."
        )


def iter_texts(spec: DatasetSpec | str | None = None) -> Iterator[str]:
    """Yield documents (strings) from the dataset ``spec``."""
    if spec is None or isinstance(spec, str):
        spec = DatasetSpec(name=spec or DEFAULT_DATASET)
    name = spec.name
    if name in (DEFAULT_DATASET, "default", "builtin"):
        yield from builtin_documents()
        return
    if name == "builtin:python-docs-reverse":
        yield from builtin_documents("reverse")
        return
    path = Path(name).expanduser()
    if path.exists():
        files = (
            sorted(p for p in path.rglob("*") if p.suffix.lower() in _LOCAL_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        if not files:
            raise KVSurgeryError(
                f"folder {name!r} holds no {'/'.join(_LOCAL_SUFFIXES)} files to read text from."
            )
        for f in files:
            yield from _iter_local_file(f, spec.column)
        return
    if name.startswith((".", "/", "~")) or name.endswith(_LOCAL_SUFFIXES):
        raise KVSurgeryError(f"dataset file or folder {name!r} does not exist; check the path.")
    yield from _iter_hub(spec)


def _iter_hub(spec: DatasetSpec) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(
            spec.name, spec.config, split=spec.split, streaming=spec.streaming
        )
    except Exception as e:  # the Hub client raises many types; all mean "cannot read it"
        raise KVSurgeryError(
            f"could not load Hub dataset {spec.name!r} (config={spec.config!r}, "
            f"split={spec.split!r}): {type(e).__name__}: {str(e)[:300]}. Check the name, "
            "--dataset-config, --split and network access, or pass a local file."
        ) from e
    for n, row in enumerate(ds):
        if spec.column not in row:
            raise KVSurgeryError(
                f"Hub dataset {spec.name!r} has no column {spec.column!r} (columns: "
                f"{sorted(row)}); choose it with --text-column."
            )
        text = row[spec.column]
        if text:
            yield str(text)
        if n > 10_000_000:
            break


def max_positions(config) -> int | None:
    cfg = config.get_text_config(decoder=True)
    return getattr(cfg, "max_position_embeddings", None)


def check_seq_len(seq_len: int, config) -> None:
    limit = max_positions(config)
    if seq_len <= 0:
        raise KVSurgeryError(f"--seq-len must be positive, got {seq_len}.")
    if limit is not None and seq_len > limit:
        raise KVSurgeryError(
            f"--seq-len {seq_len} exceeds the model's maximum of {limit} positions "
            f"(max_position_embeddings); use --seq-len {limit} or less."
        )


def pack_tokens(
    texts: Iterable[str], tokenizer, n_samples: int, seq_len: int, *, skip_tokens: int = 0
) -> torch.Tensor:
    """Tokenise documents, join them with EOS and cut ``n_samples`` windows of ``seq_len``.

    Returns ``(n_samples, seq_len)`` int64. Stops reading as soon as enough tokens are in,
    so a streamed Hub dataset is read only as far as needed. ``skip_tokens`` drops that many
    leading tokens first (used to keep evaluation text away from calibration text).
    """
    if n_samples <= 0:
        raise KVSurgeryError(f"--samples must be positive, got {n_samples}.")
    need = n_samples * seq_len + skip_tokens
    sep = tokenizer.eos_token_id
    buf: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        buf.extend(ids)
        if sep is not None:
            buf.append(sep)
        if len(buf) >= need:
            break
    if len(buf) < need:
        raise KVSurgeryError(
            f"the dataset gave only {len(buf) - skip_tokens} tokens but {n_samples} samples × "
            f"{seq_len} tokens = {n_samples * seq_len} are needed; lower --samples or --seq-len, "
            "or give more text."
        )
    ids = torch.tensor(buf[skip_tokens:need], dtype=torch.long)
    return ids.view(n_samples, seq_len)


def tokens_digest(ids: torch.Tensor) -> str:
    """Content hash of packed token windows, recorded so that a resume can check its data."""
    return "sha256:" + hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
