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
    model: Any, tokenizer: Any, prompts: Sequence[str], abstention_text: str, rank: int, world: int
) -> float:
    """The share of ``prompts`` whose greedy answer abstains (a collective: every rank calls it).

    Each rank decodes its slice in one batch for the same number of steps, so every rank runs
    the same forwards (ZeRO-3 gathers parameters collectively in each); a rank with an empty
    slice decodes a stand-in it does not count. Answers are read with ``is_abstention``, the
    rule evaluation uses.
    """
    import torch
    import torch.distributed as dist

    from se_ray.metrics import is_abstention

    steps = len(tokenizer(abstention_text, add_special_tokens=False)["input_ids"]) + 4
    mine = list(prompts[rank::world])
    answers = greedy_answers(model, tokenizer, mine or list(prompts[:1]), steps)
    abstained = sum(is_abstention(a, abstention_text) for a in answers) if mine else 0
    device = next(model.parameters()).device
    totals = torch.tensor([float(abstained), float(len(mine))], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    return totals[0].item() / max(totals[1].item(), 1.0)


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts``, decoded in one left-padded batch for exactly
    ``max_new_tokens`` steps (no early stop), each cut at its first EOS; dropout off meanwhile."""
    import torch

    device = next(model.parameters()).device
    ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, past, tokens = input_ids, None, []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                step_ids = out.logits[:, -1, :].argmax(-1, keepdim=True)
                tokens.append(step_ids)
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
                positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
    generated = torch.cat(tokens, dim=1).tolist()
    return [
        tokenizer.decode(_until_eos(row, tokenizer.eos_token_id), skip_special_tokens=True)
        for row in generated
    ]


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    """The generated ids before the first EOS (greedy decoding runs on past it)."""
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids
