"""Which training step to export: ``train.select_checkpoint``.

``last`` exports the weights of the last step. ``label_rate`` probes the model during training:
every ``train.select_every_steps`` steps and at each epoch's end, greedy answers to held-out
questions (``se-ray run``: its validation split; ``se-ray train``: ``train.select_questions``);
the step exported is the one whose abstention rate on them is closest to the share of training
labels that are abstentions (ties: the later step).

Why: how often a fine-tuned model abstains moves far more between runs than its labels do. On
three seeds of the quickstart, 44-47% of the training questions were labelled "abstain" and the
trained models abstained on 65%, 58% and 18% of their test questions. Probed every 2 steps, the
rate swings (0, 5, 85, 92, 37, 5, 37, 50, ... 55% on one run): where the last step lands is
close to chance. The labels say how often to abstain on questions like these; the probe holds
the exported model to it, with no answer judged correct or wrong (no references are read) and
no test question seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SELECT_LAST = "last"
SELECT_LABEL_RATE = "label_rate"


@dataclass(frozen=True)
class SelectionPlan:
    """What the workers probe with: the questions, the labels' abstention share, the abstention text."""

    questions: list[tuple[str, str | None]]  # (question, context)
    target_rate: float
    abstention_text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "questions": [list(q) for q in self.questions],
            "target_rate": self.target_rate,
            "abstention_text": self.abstention_text,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionPlan:
        return cls([(q, c) for q, c in d["questions"]], float(d["target_rate"]), d["abstention_text"])


def improves(rate: float, best_rate: float | None, target: float) -> bool:
    """Whether a probe at a later step displaces the best so far: no farther from the target."""
    return best_rate is None or abs(rate - target) <= abs(best_rate - target)


def closest_step(probes: Sequence[tuple[int, float]], target: float) -> int | None:
    """The step whose abstention rate is closest to ``target`` (ties: the later step); None if none."""
    best_step, best_rate = None, None
    for step, rate in sorted(probes):
        if improves(rate, best_rate, target):
            best_step, best_rate = step, rate
    return best_step


def probe_steps(every: int | None, steps_per_epoch: int, total_steps: int) -> list[int]:
    """The steps probed: every ``every`` steps and each epoch's last step."""
    ends = set(range(steps_per_epoch, total_steps + 1, steps_per_epoch)) | {total_steps}
    regular = set(range(every, total_steps + 1, every)) if every else set()
    return sorted(ends | regular)


def probe_abstention_rate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    abstention_text: str,
    rank: int,
    world: int,
    chunk_size: int = 32,
    synced: bool = False,
) -> float:
    """The share of ``prompts`` (token ids) whose greedy answer abstains (a collective: every rank calls it).

    Each rank decodes its slice in chunks of ``chunk_size``. Every rank makes the same number of
    ``generate`` calls (a rank with fewer prompts decodes a stand-in it does not count), and with
    ``synced`` (ZeRO-3, whose forwards gather parameters collectively) each call runs in lockstep
    across the ranks: HF ``generate(synced_gpus=True)`` keeps a finished rank stepping until all
    are done. Answers are read with ``is_abstention``, the rule evaluation uses.
    """
    import torch
    import torch.distributed as dist

    from se_ray.abstention import is_abstention

    max_new_tokens = len(tokenizer(abstention_text, add_special_tokens=False)["input_ids"]) + 4
    answers = probe_answers(model, tokenizer, prompts, rank, world, max_new_tokens, chunk_size, synced)
    abstained = sum(is_abstention(a, abstention_text) for a in answers)
    device = next(model.parameters()).device
    totals = torch.tensor([float(abstained), float(len(answers))], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals[0].item() / max(totals[1].item(), 1.0)


def probe_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    rank: int,
    world: int,
    max_new_tokens: int,
    chunk_size: int = 32,
    synced: bool = False,
) -> list[str]:
    """This rank's greedy answers to its slice of ``prompts`` (every ``world``-th one), decoded in
    chunks; every rank makes the same number of ``generate`` calls (see ``probe_chunks``)."""
    mine = [list(p) for p in prompts[rank::world]]
    answers: list[str] = []
    for start, stop in probe_chunks(len(mine), len(prompts), world, chunk_size):
        batch = mine[start:stop]
        decoded = greedy_answers(model, tokenizer, batch or [list(prompts[0])], max_new_tokens, synced)
        answers += decoded if batch else []  # a stand-in keeps the ranks in step; it is not counted
    return answers


def probe_chunks(mine: int, total: int, world: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk a rank holding ``mine`` of ``total`` prompts decodes.

    Every rank gets the same number of chunks, that of the largest slice (ceil(total / world)
    prompts); a rank's chunks past its own prompts are empty.
    """
    largest = -(-total // world)
    count = max(1, -(-largest // chunk_size))
    return [(min(k * chunk_size, mine), min((k + 1) * chunk_size, mine)) for k in range(count)]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the model's generation config may list several (Llama-3: two)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, synced: bool = False
) -> list[str]:
    """Greedy continuations of ``prompts`` (token ids), one left-padded HF ``generate`` call; each
    stops at any EOS id, and logits are computed at the last position only (``logits_to_keep``,
    which ``generate`` sets). Dropout is off meanwhile."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=generation, synced_gpus=synced
            )
    finally:
        model.train(was_training)
    generated = out[:, width:].tolist()
    return [tokenizer.decode(until_eos(row, eos), skip_special_tokens=True) for row in generated]


def until_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The generated ids before the first of any EOS id (a finished row is padded after it)."""
    stops = set(eos_ids)
    for k, token in enumerate(ids):
        if token in stops:
            return list(ids[:k])
    return list(ids)
