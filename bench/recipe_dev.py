"""Tune the training recipe on a development set, never on the test split.

The run's validation split (40 questions, about 35 answerable) chooses τ; it is too small to
tell two training recipes apart. This script takes the questions that a `se-ray run` of the
same split seed left out of every split (train, validation, test), answers the first
``--dev`` of them with the base model and with every trained adapter under the run's
``trials/`` (one engine serves them all), and prints per model: AED, correct / incorrect /
abstained, how many of the base model's right answers it kept, how many fewer incorrect
answers it gave, and its abstention on questions about places that do not exist.

    .venv/bin/python bench/recipe_dev.py --run out/tune/seed0 --seed 0 --dev 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from se_ray import columns as col
from se_ray.config import load_config
from se_ray.console import SummaryOutput
from se_ray.data import load_questions
from se_ray.engine import Engines
from se_ray.evaluate import AnswerFlags, evaluate_rows, lora_engine_config
from se_ray.judges.correctness import build_judge
from se_ray.run.plan import UNTUNED, seeded_order, split_rows
from se_ray.run.results import retention
from se_ray.storage import Store

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "quickstart.yaml"


def dev_questions(rows: list[dict[str, Any]], cfg: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` scorable questions, in the split's seeded order, that no split holds."""
    used = {r[col.ID] for part in split_rows(rows, cfg.split).values() for r in part}
    order = seeded_order(rows, cfg.split.seed)
    return [r for r in order if r[col.ID] not in used and col.is_scorable(r)][:n]


def recipe(trial: Path) -> str:
    train = yaml.safe_load((trial / "train" / "train_config.yaml").read_text())["train"]
    name = f"{trial.name}: {train['epochs']} epochs, lr {train['learning_rate']:g}"
    if train.get("select_checkpoint", "last") == "last":
        return name
    summary = json.loads((trial / "train_summary.json").read_text())
    return f"{name}, step {summary['selected_step']} by label rate"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a se-ray run output folder")
    p.add_argument("--seed", type=int, default=0, help="the run's split seed")
    p.add_argument("--dev", type=int, default=200, help="development questions")
    p.add_argument("--config", type=Path, default=CONFIG)
    args = p.parse_args()

    cfg = load_config(args.config, [f"split.seed={args.seed}", f"sampling.seed={args.seed}"])
    dev = dev_questions(load_questions(cfg.input, cfg.data, cfg.storage).rows, cfg, args.dev)
    trials = sorted(t for t in (args.run / "trials").iterdir() if (t / "train" / "adapter").is_dir())
    models: dict[str, tuple[str, str | None]] = {"base": ("base", None)}
    models.update({t.name: (recipe(t), str(t / "train" / "adapter")) for t in trials})
    out = args.run / f"dev{args.dev}"
    scores: dict[str, dict[str, Any]] = {}
    # Ray and vLLM log to fd 1; the table alone goes to stdout
    with (
        SummaryOutput(restore=True),
        Engines(cfg, lora_engine_config(cfg.sampling, cfg.train.lora_r)) as engines,
    ):
        for folder, (name, adapter) in models.items():
            done = out / folder / "dev_scores.json"
            if done.exists():  # evaluated by an earlier call
                scores[name] = json.loads(done.read_text())
                continue
            judge = build_judge(cfg.eval, None, cfg.sampling.batch_size)
            store = Store(str(out / folder), cfg.storage)
            summary, flags = evaluate_rows(cfg, dev, engines.generation(), judge, store, adapter)
            keys = ("aed", "correct", "incorrect", "abstained", "unanswerable_abstained")
            scores[name] = {**{k: summary[k] for k in keys}, "flags": flags.to_dict()}
            done.write_text(json.dumps(scores[name]))

    base = scores["base"]
    answerable = base["correct"] + base["incorrect"] + base["abstained"]
    print(f"{len(dev)} development questions ({answerable} answerable)")
    print(f"{'model':60} {'AED':>6} {'C':>4} {'I':>4} {'A':>4} {'kept':>6} {'fewer I':>8} {'unans':>5}")
    base_flags = AnswerFlags(**base["flags"])
    for name, s in scores.items():
        kept = retention({UNTUNED: base_flags, name: AnswerFlags(**s["flags"])})[name]
        s["kept"] = kept["still_right"] / max(kept["untuned_right"], 1)
        s["fewer_incorrect"] = 1 - s["incorrect"] / max(base["incorrect"], 1)
        print(f"{name[:60]:60} {s['aed']:6.3f} {s['correct']:4} {s['incorrect']:4} {s['abstained']:4} "
              f"{s['kept']:6.0%} {s['fewer_incorrect']:8.0%} {s['unanswerable_abstained']:5}")  # fmt: skip
    (out / "scores.json").write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    sys.exit(main())
