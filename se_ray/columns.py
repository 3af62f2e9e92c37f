"""Column names and Arrow schemas of the tables se-ray reads and writes, and the two
helpers every stage uses to add and check columns."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

# questions
ID = "id"
QUESTION = "question"
REFERENCES = "references"
CONTEXT = "context"
ANSWERABLE = "answerable"  # optional; false marks a question about something that does not exist
RELATION = "relation"  # optional: what kind of fact the question asks (report only)
BAND = "band"  # optional: popularity band of the question's subject (report only)
POPULARITY = "popularity"  # optional: e.g. the subject's population (report only)

# sample stage
SAMPLES = "samples"
SAMPLE_LOGPROBS = "sample_logprobs"  # mean token log-prob per sample
SAMPLE_LOGPROB_SUMS = "sample_logprob_sums"
SAMPLE_TOKEN_COUNTS = "sample_token_counts"
STANDARD_ANSWER = "standard_answer"
STANDARD_LOGPROB = "standard_logprob"
NUM_GENERATED = "num_generated"  # samples actually generated (early stop may save some)

REJECTED = "rejected"  # internal: why the engine would not take the row; never written to labels

# entropy stage
CLUSTER_IDS = "cluster_ids"
SEMANTIC_ENTROPY = "semantic_entropy"  # discrete, nats
REGULAR_SEMANTIC_ENTROPY = "regular_semantic_entropy"
EXACT_ENTROPY = "exact_entropy"
ENTAILMENT_CALLS = "entailment_calls"

# label stage
TAU = "tau"
ABSTAIN = "abstain"
TARGET = "target"
LABEL_METHOD = "label_method"

# evaluation results (results.parquet, beside the question columns)
ANSWER = "answer"
ABSTAINED = "abstained"
CORRECT = "correct"
JUDGE = "judge"
# optional, with eval.scores / --abstain-by (se_ray.scoring): higher means more reason to abstain
SE_SCORE = "se_score"  # semantic entropy of M samples of the evaluated model, nats
ABSTAIN_LOGPROB = "abstain_logprob"  # teacher-forced log-prob of labeling.abstention_text
ANSWER_CORRECT = "answer_correct"  # the model's own answer judged, even where a score rule abstains

_FLOATS, _INTS, _STRINGS = pa.list_(pa.float64()), pa.list_(pa.int64()), pa.list_(pa.string())

QUESTION_FIELDS = (
    (ID, pa.string()),
    (QUESTION, pa.string()),
    (REFERENCES, _STRINGS),
    (CONTEXT, pa.string()),
)
SAMPLE_FIELDS = (
    (SAMPLES, _STRINGS),
    (SAMPLE_LOGPROBS, _FLOATS),
    (SAMPLE_LOGPROB_SUMS, _FLOATS),
    (SAMPLE_TOKEN_COUNTS, _INTS),
    (STANDARD_ANSWER, pa.string()),
    (STANDARD_LOGPROB, pa.float64()),
    (NUM_GENERATED, pa.int64()),
)
ENTROPY_FIELDS = (
    (CLUSTER_IDS, _INTS),
    (SEMANTIC_ENTROPY, pa.float64()),
    (REGULAR_SEMANTIC_ENTROPY, pa.float64()),
    (EXACT_ENTROPY, pa.float64()),
    (ENTAILMENT_CALLS, pa.float64()),
)
LABEL_FIELDS = (
    (TAU, pa.float64()),
    (ABSTAIN, pa.bool_()),
    (TARGET, pa.string()),
    (LABEL_METHOD, pa.string()),
)
RESULT_FIELDS = (
    (ANSWER, pa.string()),
    (ABSTAINED, pa.bool_()),
    (CORRECT, pa.bool_()),
    (JUDGE, pa.string()),
)


def question_schema() -> pa.Schema:
    return pa.schema(QUESTION_FIELDS)


def label_schema() -> pa.Schema:
    """``labels/part-*.parquet``: the question, what the sample and entropy stages add, the label."""
    return pa.schema(QUESTION_FIELDS + SAMPLE_FIELDS + ENTROPY_FIELDS + LABEL_FIELDS)


def results_schema() -> pa.Schema:
    """``results.parquet`` of an evaluation."""
    return pa.schema(QUESTION_FIELDS[:3] + RESULT_FIELDS)


def is_answerable(row: dict[str, Any]) -> bool:
    """Only an explicit ``answerable: false`` marks a question about something that does not exist."""
    return row.get(ANSWERABLE) is not False


def is_scorable(row: dict[str, Any]) -> bool:
    """Evaluation can score the row: it has references, or it is known to have no answer."""
    return bool(row.get(REFERENCES)) or not is_answerable(row)


def with_columns(table: pa.Table, columns: dict[str, tuple[list[Any], pa.DataType]]) -> pa.Table:
    """``table`` plus (or with replaced) typed columns."""
    for name, (values, dtype) in columns.items():
        array = pa.array(values, type=dtype)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table


def require_columns(table: pa.Table | pa.Schema, where: str, names: tuple[str, ...] | list[str]) -> None:
    """Raise naming ``where`` and the missing columns."""
    present = table.names if isinstance(table, pa.Schema) else table.column_names
    missing = [n for n in names if n not in present]
    if missing:
        raise KeyError(f"{where} needs columns {missing}, got {present}")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` cast to ``schema``; absent columns become typed nulls (all-null ones arrive as null)."""
    arrays = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)
