"""Score entailment judges on the labelled answer pairs, and SE's AUROC with each judge.

    python bench/entailment_pairs.py                 # all judges (loads MiniLM, ~1 min on CPU)
    python bench/entailment_pairs.py --no-models     # only the model-free residual judge

Pairs: ``tests/data/entailment_pairs.jsonl`` (answers sampled from SmolLM2-135M, labelled by
hand; ``split`` dev/test by question hash). A judge calls a pair equivalent when it finds
entailment in both directions (strict, as the clustering does). Judges:

* ``embedding``: today's judge, MiniLM cosine of "{question} {answer}" >= 0.85;
* ``residual``: ``se_ray.judges.residual.ResidualJudge`` without a model;
* ``residual+minilm``: the same, plus MiniLM cosine of the residuals >= a threshold chosen on
  the dev split only (the test split is reported with it).

Second part, on ``bench/data/entailment_samples.jsonl`` (the same run's questions with
references, M=10 samples and the standard answer): discrete SE from today's clustering (as
labelled in that run) and from re-clustering the same samples greedily with each judge,
and the AUROC of each for "the standard answer is wrong" (wrong: no normalised reference
occurs as whole tokens in it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se_ray import entropy  # noqa: E402
from se_ray.judges.entailment import ENTAILMENT  # noqa: E402
from se_ray.judges.residual import ResidualJudge  # noqa: E402

PAIRS = ROOT / "tests" / "data" / "entailment_pairs.jsonl"
SAMPLES = ROOT / "bench" / "data" / "entailment_samples.jsonl"
THRESHOLDS = [round(0.70 + 0.01 * i, 2) for i in range(30)]

Equivalence = Callable[[str, str, str], bool]


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_of(question: str) -> str:
    """dev or test, by a hash of the question (the rule the pairs file was split with)."""
    return "dev" if int(hashlib.sha1(question.encode()).hexdigest(), 16) % 2 == 0 else "test"


# ---------------------------------------------------------------------------- models


def entailment_module() -> Any:
    try:
        from se_ray.judges import entailment  # the package layout being introduced
    except ImportError:
        from se_ray import entailment
    return entailment


class MiniLM:
    """Mean-pooled, L2-normalised MiniLM embeddings (as the landed EmbeddingJudge computes them)."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from se_ray.models import resolve_model

        path = resolve_model("builtin:all-minilm-l6-v2")
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        out = []
        for start in range(0, len(texts), 64):
            enc = self.tokenizer(
                texts[start : start + 64], padding=True, truncation=True, return_tensors="pt"
            )
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def embedding_equivalence(triples: Sequence[tuple[str, str, str]]) -> Equivalence:
    """Today's judge, run once over every (question, a, b) it will be asked about."""
    ent = entailment_module()
    from se_ray.config import EntailmentConfig

    judge = ent.EmbeddingJudge(EntailmentConfig())
    queries = []
    for q, a, b in triples:
        queries += [ent.Query(q, a, b), ent.Query(q, b, a)]
    verdicts = judge.implications(queries)
    table = {
        t: verdicts[2 * i] == ent.ENTAILMENT and verdicts[2 * i + 1] == ent.ENTAILMENT
        for i, t in enumerate(triples)
    }
    return lambda q, a, b: table[(q, a, b)]


def residual_equivalence(judge: ResidualJudge, triples: Sequence[tuple[str, str, str]]) -> Equivalence:
    queries = []
    for q, a, b in triples:
        queries += [_Q(q, a, b), _Q(q, b, a)]
    verdicts = judge.implications(queries)
    table = {
        t: verdicts[2 * i] == ENTAILMENT and verdicts[2 * i + 1] == ENTAILMENT for i, t in enumerate(triples)
    }
    return lambda q, a, b: table[(q, a, b)]


class _Q:
    __slots__ = ("question", "premise", "hypothesis")

    def __init__(self, question: str, premise: str, hypothesis: str):
        self.question, self.premise, self.hypothesis = question, premise, hypothesis


# ---------------------------------------------------------------------------- pairs


def accuracy(pairs: Sequence[dict[str, Any]], judge: Equivalence) -> float:
    if not pairs:
        return float("nan")
    return sum(judge(p["question"], p["a"], p["b"]) == p["equivalent"] for p in pairs) / len(pairs)


def pair_report(pairs: list[dict[str, Any]], judges: dict[str, Equivalence]) -> dict[str, Any]:
    splits = {
        "dev": [p for p in pairs if p["split"] == "dev"],
        "test": [p for p in pairs if p["split"] == "test"],
    }
    splits["all"] = pairs
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in pairs:
        by_kind[p["kind"]].append(p)
    names = list(judges)
    width = max(len(n) for n in names) + 2
    print(f"\npairs: {len(pairs)} ({sum(p['equivalent'] for p in pairs)} equivalent); accuracy")
    print(f"{'judge':{width}s}" + "".join(f"{s:>10s}" for s in splits))
    out: dict[str, Any] = {}
    for name in names:
        accs = {s: accuracy(ps, judges[name]) for s, ps in splits.items()}
        out[name] = {"accuracy": accs}
        print(f"{name:{width}s}" + "".join(f"{accs[s]:10.3f}" for s in splits))
    print(
        f"\nper kind (all splits; n, equivalent share, accuracy per judge)\n{'kind':22s}{'n':>5s}{'eq':>6s}",
        end="",
    )
    print("".join(f"{n[:16]:>18s}" for n in names))
    for kind in sorted(by_kind, key=lambda k: -len(by_kind[k])):
        ps = by_kind[kind]
        eq = sum(p["equivalent"] for p in ps) / len(ps)
        row = f"{kind:22s}{len(ps):5d}{eq:6.2f}" + "".join(f"{accuracy(ps, judges[n]):18.3f}" for n in names)
        print(row)
        for n in names:
            out[n].setdefault("by_kind", {})[kind] = accuracy(ps, judges[n])
    return out


def errors(pairs: list[dict[str, Any]], judge: Equivalence, limit: int) -> None:
    wrong = [p for p in pairs if judge(p["question"], p["a"], p["b"]) != p["equivalent"]]
    print(f"  {len(wrong)} errors; first {min(limit, len(wrong))}:")
    for p in wrong[:limit]:
        where = f"[{p['split']}/{p['kind']}] gold={p['equivalent']}"
        print(f"    {where} {p['question']!r}: {p['a']!r} | {p['b']!r}")


# ---------------------------------------------------------------------------- SE AUROC


def contains_reference(answer: str, references: Sequence[str]) -> bool:
    tokens = entropy.normalize_answer(answer).split()
    for ref in references:
        r = entropy.normalize_answer(ref).split()
        if r and any(tokens[i : i + len(r)] == r for i in range(len(tokens) - len(r) + 1)):
            return True
    return False


def auroc(positive: Sequence[bool], scores: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    pos = [s for p, s in zip(positive, scores, strict=True) if p]
    neg = [s for p, s in zip(positive, scores, strict=True) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def bootstrap_interval(
    positive: Sequence[bool], scores: Sequence[float], samples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the AUROC (questions resampled with replacement)."""
    rng = np.random.default_rng(seed)
    pos, sc = np.asarray(positive), np.asarray(scores)
    values = []
    for _ in range(samples):
        idx = rng.integers(0, len(pos), len(pos))
        value = auroc(pos[idx].tolist(), sc[idx].tolist())
        if not np.isnan(value):
            values.append(value)
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def recluster_entropy(question: str, samples: Sequence[str], judge: Equivalence) -> float:
    ids = entropy.semantic_ids(len(samples), lambda i, j: judge(question, samples[i], samples[j]))
    return entropy.discrete_semantic_entropy(ids)


def se_report(rows: list[dict[str, Any]], judges: dict[str, Equivalence]) -> dict[str, Any]:
    rows = [r for r in rows if r.get("answerable", True) and r.get("references")]
    wrong = [not contains_reference(r["standard_answer"], r["references"]) for r in rows]
    scores: dict[str, list[float]] = {"embedding (as labelled)": [r["semantic_entropy"] for r in rows]}
    for name, judge in judges.items():
        scores[f"{name} (re-clustered)"] = [
            recluster_entropy(r["question"], r["samples"], judge) for r in rows
        ]
    groups = {
        "all": [True] * len(rows),
        "geo": [r["source"] == "geo" for r in rows],
        "nq": [r["source"] == "nq" for r in rows],
    }
    print("\nSE AUROC for 'standard answer is wrong' (containment judge)")
    header = "".join(
        f"{g} (n={sum(m)}, wrong={sum(w for w, k in zip(wrong, m, strict=True) if k)})".rjust(30)
        for g, m in groups.items()
    )
    print(f"{'clustering':34s}{header}")
    out: dict[str, Any] = {}
    for name, values in scores.items():
        cells = {}
        for g, mask in groups.items():
            w = [x for x, k in zip(wrong, mask, strict=True) if k]
            v = [x for x, k in zip(values, mask, strict=True) if k]
            cells[g] = auroc(w, v)
        mean_se = float(np.mean(values))
        geo = groups["geo"]
        interval = bootstrap_interval(
            [x for x, k in zip(wrong, geo, strict=True) if k],
            [x for x, k in zip(values, geo, strict=True) if k],
        )
        out[name] = {"auroc": cells, "geo_auroc_95": interval, "mean_se": mean_se}
        print(
            f"{name:34s}"
            + "".join(f"{cells[g]:30.3f}" for g in groups)
            + f"   geo 95% [{interval[0]:.3f}, {interval[1]:.3f}]   mean SE {mean_se:.3f}"
        )
    return out


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=PAIRS)
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--no-models", action="store_true", help="only the model-free residual judge")
    parser.add_argument("--errors", type=int, default=0, help="print this many misjudged pairs per judge")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    pairs = load_jsonl(args.pairs)
    samples = load_jsonl(args.samples) if args.samples.exists() else []
    triples = {(p["question"], p["a"], p["b"]) for p in pairs}
    for r in samples:
        s = r["samples"]
        triples |= {(r["question"], s[i], s[j]) for i in range(len(s)) for j in range(i + 1, len(s))}
    triples_list = sorted(triples)

    started = time.time()
    judges: dict[str, Equivalence] = {}
    residual_judge = ResidualJudge()
    judges["residual"] = residual_equivalence(residual_judge, triples_list)
    chosen = None
    if not args.no_models:
        judges["embedding"] = embedding_equivalence(triples_list)
        minilm = MiniLM()
        dev = [p for p in pairs if p["split"] == "dev"]
        sweep = {}
        for t in THRESHOLDS:
            j = residual_equivalence(
                ResidualJudge(embed=minilm, threshold=t), [(p["question"], p["a"], p["b"]) for p in dev]
            )
            sweep[t] = accuracy(dev, j)
        best = max(sweep.values())
        chosen = max(t for t, a in sweep.items() if a == best)  # the highest threshold among the best
        print(
            "residual+minilm dev accuracy by threshold: "
            + ", ".join(f"{t:.2f}:{a:.3f}" for t, a in sweep.items())
        )
        print(f"chosen on dev: {chosen:.2f}")
        judges["residual+minilm"] = residual_equivalence(
            ResidualJudge(embed=minilm, threshold=chosen), triples_list
        )
        judges = {k: judges[k] for k in ("embedding", "residual", "residual+minilm")}

    result: dict[str, Any] = {"pairs": pair_report(pairs, judges), "threshold": chosen}
    if args.errors:
        for name, judge in judges.items():
            print(f"\n{name}:")
            errors(pairs, judge, args.errors)
    if samples:
        result["se_auroc"] = se_report(samples, judges)
    print(f"\n{time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
