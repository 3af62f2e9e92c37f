"""Load questions (JSONL, JSON, Parquet, Hugging Face datasets) into validated rows.

Every input row becomes either a question ``{id, question, references, context}`` or a
reject ``{source, line, id, reason}``: nothing is dropped silently. Validation runs in
the driver because duplicate ids are a property of the whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from se_ray import columns as col
from se_ray.config import DataConfig, StorageConfig
from se_ray.storage import exists, filesystem, is_uri

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)


class InputError(RuntimeError):
    """The input as a whole cannot be used (missing file, unknown format, no valid row). One line."""


@dataclass
class LoadedQuestions:
    rows: list[dict[str, Any]]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""

    def to_arrow(self):
        import pyarrow as pa

        return pa.Table.from_pylist(self.rows, schema=question_schema())


def question_schema():
    import pyarrow as pa

    return pa.schema(
        [
            (col.ID, pa.string()),
            (col.QUESTION, pa.string()),
            (col.REFERENCES, pa.list_(pa.string())),
            (col.CONTEXT, pa.string()),
        ]
    )


def stable_id(question: str) -> str:
    return "q-" + hashlib.sha1(question.strip().encode()).hexdigest()[:16]


# A raw record: (line number or None, record or the exception that made it unreadable, raw text)
RawRecord = tuple[int | None, Any, str]


def _detect_format(path: str, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    name = Path(path).name.lower()
    if "nq-open" in name or "nq_open" in name:
        return "nq_open"
    if "svamp" in name:
        return "svamp"
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet") or (not is_uri(path) and Path(path).is_dir()):
        return "parquet"
    return "hf"


def _read_lines(path: str, storage: StorageConfig) -> Iterator[RawRecord]:
    fs, inner = filesystem(path, storage)
    with fs.open_input_stream(inner) as f:
        text = f.read().decode("utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array (SVAMP ships this way)
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        for i, record in enumerate(records):
            yield i + 1, record, json.dumps(record)[:200]  # line = 1-based row of the array
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), line[:200]
        except json.JSONDecodeError as e:
            yield lineno, e, line[:200]


def _read_parquet(path: str, storage: StorageConfig) -> Iterator[RawRecord]:
    import pyarrow.dataset as pads

    fs, inner = filesystem(path, storage)
    table = pads.dataset(inner, filesystem=fs, format="parquet").to_table()
    for i, record in enumerate(table.to_pylist()):
        yield i + 1, record, ""


def _read_hf(path: str, cfg: DataConfig) -> Iterator[RawRecord]:
    import datasets

    if Path(path).is_dir():
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.hf_split]
    else:
        ds = datasets.load_dataset(path, split=cfg.hf_split)
    for i, record in enumerate(ds):
        yield i + 1, record, ""


# Optional row fields carried through to evaluation and the report, with their types.
OPTIONAL_FIELDS: dict[str, Any] = {
    col.ANSWERABLE: bool,
    col.RELATION: str,
    col.BAND: str,
    col.POPULARITY: int | float,
}
OPTIONAL_TYPE_NAMES = {
    col.ANSWERABLE: "true or false",
    col.RELATION: "a string",
    col.BAND: "a string",
    col.POPULARITY: "a number",
}


def _adapt(record: dict[str, Any], fmt: str, cfg: DataConfig) -> dict[str, Any]:
    """Map a source record onto the row schema (fields are validated afterwards)."""
    if fmt == "svamp":
        body, q = record.get("Body"), record.get("Question")
        question = f"{body.strip()} {q.strip()}" if isinstance(body, str) and isinstance(q, str) else q
        answer = record.get("Answer")
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        return {
            col.ID: record.get("ID"),
            col.QUESTION: question,
            col.REFERENCES: None if answer is None else [str(answer)],
            col.CONTEXT: None,
        }
    references = record.get(cfg.references_field)
    if references is None:  # NQ-Open and most QA dumps call it answer(s)
        references = record.get("answer", record.get("answers"))
    if isinstance(references, dict) and "text" in references:  # SQuAD-style {"text": [...]}
        references = references["text"]
    row = {
        col.ID: record.get(cfg.id_field),
        col.QUESTION: record.get(cfg.question_field),
        col.REFERENCES: references,
        col.CONTEXT: record.get(cfg.context_field),
    }
    return row | {k: record[k] for k in OPTIONAL_FIELDS if record.get(k) is not None}


def _validate(row: dict[str, Any]) -> str | None:
    """The reason a row is rejected, or None. Normalises ``row`` in place."""
    question = row[col.QUESTION]
    if question is None:
        return "missing field 'question'"
    if not isinstance(question, str):
        return f"field 'question' must be a string, got {type(question).__name__}"
    if not question.strip():
        return "field 'question' is empty"
    row[col.QUESTION] = question.strip()
    rid = row[col.ID]
    if rid is None:
        row[col.ID] = stable_id(question)
    elif isinstance(rid, bool) or not isinstance(rid, str | int):
        return f"field 'id' must be a string or integer, got {type(rid).__name__}"
    elif isinstance(rid, str) and not rid.strip():
        return "field 'id' is empty"
    else:
        row[col.ID] = str(rid).strip()
    refs = row[col.REFERENCES]
    if isinstance(refs, str | int | float) and not isinstance(refs, bool):
        refs = [str(refs)]
    if refs is not None:
        if not isinstance(refs, list | tuple) or not all(isinstance(r, str) for r in refs):
            return "field 'references' must be a list of strings"
        refs = [r for r in refs if r.strip()]
    row[col.REFERENCES] = list(refs) if refs else None
    ctx = row[col.CONTEXT]
    if ctx is not None and not isinstance(ctx, str):
        return f"field 'context' must be a string, got {type(ctx).__name__}"
    for name, types in OPTIONAL_FIELDS.items():
        value = row.get(name)
        if value is not None and (
            not isinstance(value, types) or isinstance(value, bool) is not (types is bool)
        ):
            return f"field '{name}' must be {OPTIONAL_TYPE_NAMES[name]}, got {type(value).__name__}"
    return None


def validate_records(records: Iterable[RawRecord], source: str, fmt: str, cfg: DataConfig) -> LoadedQuestions:
    out = LoadedQuestions(rows=[], source=source)
    seen: set[str] = set()
    for lineno, record, raw in records:
        where = {"source": source, "line": lineno}
        if isinstance(record, Exception):
            out.rejects.append({**where, "id": None, "reason": f"not valid JSON: {record}", "raw": raw})
            continue
        if not isinstance(record, dict):
            out.rejects.append(
                {
                    **where,
                    "id": None,
                    "reason": f"row is a {type(record).__name__}, not an object",
                    "raw": raw,
                }
            )
            continue
        row = _adapt(record, fmt, cfg)
        reason = _validate(row)
        rid = row[col.ID] if isinstance(row[col.ID], str) else None
        if reason is None and rid in seen:
            reason = f"duplicate id {rid!r}"
        if reason is not None:
            out.rejects.append({**where, "id": rid, "reason": reason, "raw": raw})
            continue
        if cfg.limit is not None and len(out.rows) >= cfg.limit:
            break
        seen.add(rid)
        out.rows.append(row)
    return out


def load_questions(path: str, cfg: DataConfig, storage: StorageConfig | None = None) -> LoadedQuestions:
    storage = storage or StorageConfig()
    fmt = _detect_format(path, cfg)
    if fmt == "hf":
        if is_uri(path):
            raise InputError(f"input {path}: unknown format (expected .jsonl, .json, .parquet)")
        records: Iterable[RawRecord] = _read_hf(path, cfg)
    else:
        fs, inner = filesystem(path, storage)
        if not exists(fs, inner):
            raise InputError(f"input {path} does not exist")
        records = _read_parquet(path, storage) if fmt == "parquet" else _read_lines(path, storage)
    try:
        loaded = validate_records(records, source=path, fmt=fmt, cfg=cfg)
    except (OSError, ValueError) as e:
        raise InputError(f"input {path}: {e}") from None
    logger.info("loaded %d questions from %s (%d rejected)", len(loaded.rows), path, len(loaded.rejects))
    return loaded


def require_questions(loaded: LoadedQuestions, rejects_location: str) -> None:
    """Raise ``InputError`` when no row of the input is valid (call after writing the rejects)."""
    if loaded.rows:
        return
    source = loaded.source or "the input"
    if not loaded.rejects:
        raise InputError(f"no valid question in {source}: it holds no rows")
    n = len(loaded.rejects)
    first = loaded.rejects[0]
    raise InputError(
        f"no valid question in {source}: {n} row{'s' if n != 1 else ''} rejected, see {rejects_location} "
        f"(line {first['line']}: {first['reason']})"
    )


# What `se-ray train` reads from a labels table; the rest (entropies, samples) is for reports.
TRAIN_LABEL_COLUMNS = (col.ID, col.QUESTION, col.TARGET)


def require_label_columns(
    schema: pa.Schema, source: str, needed: tuple[str, ...] = TRAIN_LABEL_COLUMNS
) -> None:
    """Raise ``InputError`` naming ``source`` and the columns a labels table lacks."""
    missing = [name for name in needed if name not in schema.names]
    if missing:
        raise InputError(
            f"labels {source} lack column{'s' if len(missing) != 1 else ''} {', '.join(missing)} "
            f"(it has {', '.join(schema.names) or 'none'}); expected the labels/ folder `se-ray label` writes"
        )


def check_labels_folder(location: str, storage: StorageConfig | None = None) -> tuple[Any, str, list[str]]:
    """(filesystem, folder, committed parts) of a labels folder, or of ``location/labels``,
    every part checked for the columns training needs (Parquet footers only). ``InputError``
    for a folder without parts or a part that lacks a column."""
    import pyarrow.parquet as pq

    from se_ray.storage import join, list_parquet

    storage = storage or StorageConfig()
    try:
        fs, inner = filesystem(location, storage)
        folder = inner
        parts = list_parquet(fs, folder)
        if not parts:
            folder = join(inner, "labels")
            parts = list_parquet(fs, folder)
    except OSError as e:
        raise InputError(f"labels {location}: {' '.join(str(e).split())}") from None
    if not parts:
        raise InputError(f"labels {location}: no committed Parquet parts (nor in {join(location, 'labels')})")
    for part in parts:
        try:
            with fs.open_input_file(part) as f:
                schema = pq.ParquetFile(f).schema_arrow
        except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on a non-Parquet file
            raise InputError(
                f"labels part {part} is not readable Parquet: {' '.join(str(e).split())}"
            ) from None
        require_label_columns(schema, part)
    return fs, folder, parts
