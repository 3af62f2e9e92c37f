"""Label rows -> training examples: tokenised in the worker, batch by batch as its shard streams in,
so the driver never materialises the rows."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from se_ray import columns as col

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss

T = TypeVar("T")


def tokenize_example(
    tokenizer: Any,
    question: str,
    context: str | None,
    target: str,
    style: str,
    max_length: int,
) -> dict[str, list[int]]:
    """One SFT example: the sampling prompt, then the target and EOS; loss on the target only.

    The prompt ids are ``question_prompt_ids``, the very ids sampling and evaluation send to
    vLLM (one BOS where the model has one), and the target is tokenised apart, so that the target
    tokens are exactly the ones the model would generate after the prompt. Over ``max_length``
    the prompt is cut from the left (its end, the assistant header, must stay; so does a leading
    BOS, ``prompt_end``) and the target keeps at least half of the budget.
    """
    from se_ray.prompts import question_prompt_ids

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: cannot end the target")
    prompt_ids = question_prompt_ids(tokenizer, question, style, context)
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(target_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_length - len(target_ids), max_length // 2))
        target_ids = target_ids[: max_length - keep_prompt]
        prompt_ids = prompt_end(prompt_ids, keep_prompt, tokenizer.bos_token_id)
    input_ids = prompt_ids + target_ids
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        "attention_mask": [1] * len(input_ids),
    }


def prompt_end(prompt_ids: Sequence[int], keep: int, bos_id: int | None) -> list[int]:
    """The last ``keep`` prompt ids, except that a sequence-start BOS (first, and nowhere else in
    the prompt, as Llama-3's ``<|begin_of_text|>``) stays first: a model trained after a BOS never
    sees a prompt without one. SmolLM2's "BOS" opens every turn and is cut like any other id."""
    ids = list(prompt_ids)
    if keep >= len(ids):
        return ids
    if keep <= 0:
        return []
    if bos_id is not None and ids[0] == bos_id and ids.count(bos_id) == 1:
        return [bos_id] + ids[len(ids) - keep + 1 :]
    return ids[len(ids) - keep :]


def pad_batch(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad tokenised examples into int64 numpy arrays (labels padded with -100)."""
    import numpy as np

    if not examples:
        raise ValueError("pad_batch needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    out = {
        "input_ids": np.full((len(examples), width), pad_token_id, dtype=np.int64),
        "labels": np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64),
        "attention_mask": np.zeros((len(examples), width), dtype=np.int64),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        out["input_ids"][i, :n] = e["input_ids"]
        out["labels"][i, :n] = e["labels"]
        out["attention_mask"][i, :n] = e["attention_mask"]
    return out


def _text_or_none(value: Any) -> str | None:
    """A Parquet cell as text; None for null, NaN and blank cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


class TokenizeCollate:
    """``collate_fn`` of ``iter_torch_batches``: raw label rows -> padded torch tensors."""

    def __init__(self, tokenizer: Any, style: str, max_length: int):
        self.tokenizer = tokenizer
        self.style = style
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        self.pad_token_id = tokenizer.eos_token_id if pad is None else pad

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        missing = [c for c in (col.QUESTION, col.TARGET) if c not in batch]
        if missing:
            raise KeyError(f"labels rows lack column(s) {missing}; got {sorted(batch)}")
        contexts = batch.get(col.CONTEXT)
        examples = []
        for i, question in enumerate(batch[col.QUESTION]):
            target = _text_or_none(batch[col.TARGET][i])
            if target is None:
                raise ValueError(f"labels row with question {question!r} has an empty target")
            context = _text_or_none(contexts[i]) if contexts is not None else None
            examples.append(
                tokenize_example(self.tokenizer, str(question), context, target, self.style, self.max_length)
            )
        return {k: torch.from_numpy(v) for k, v in pad_batch(examples, self.pad_token_id).items()}


def stream_collate(inner: TokenizeCollate) -> Any:
    """Wrap a ``TokenizeCollate`` as the numpy-batch collate class Ray Data expects."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            return inner(batch)

    return _Collate()


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Yield (item, is_last) with one item of look-ahead: a stream's length is not known up front."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True
