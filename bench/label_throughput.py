"""Labeling throughput: a reference-style loop vs raw vLLM vs `se-ray label`, on the same questions.

    python bench/label_throughput.py                       # 32 NQ questions, M=10, 32 tokens
    python bench/label_throughput.py --questions 256 --skip reference
    python bench/label_throughput.py --set sampling.cpu_reserved_cores=1   # vLLM's own default here

Each system runs in its own subprocess, one after the other, so that each one's memory
(summed RSS over its process tree, Ray workers and vLLM engine processes included) and
end-to-end time (from the launch of that subprocess: imports, Ray start, engine start,
the work, engine teardown) are its own:

- ``reference``: the sequential loop of jlko/semantic_uncertainty, written here. Per
  question one Hugging Face ``generate`` call for the M high-temperature answers and one
  for the standard answer (fp32 on CPU, the same chat prompt and sampling settings), then
  the reference ``get_semantic_ids`` loop (``entropy.semantic_ids`` with a callable) asking
  the same judge class one ordered pair at a time, with no cache between calls (each call
  is one model forward, as with the reference's NLI model).
- ``raw``: ``vllm.LLM.generate`` of every prompt with both sampling-parameter sets in one
  call, on an engine built exactly as se-ray builds its engine actor (same settings and
  environment), no Ray and no entailment.
- ``serray``: ``label_job`` (what ``se-ray label`` runs) on a fresh local Ray cluster, or on
  ``--ray-address``.
- ``early_stop``: the same with ``sampling.early_stop=true``.

Steady state is measured after the model or engine is ready: the reference loop itself;
the raw ``generate`` call; for se-ray from the end of the engine actor's ``__init__`` (or,
for a reused engine, the job start plus ``engine_ready_s``) to the commit of the last
labels part. Where the time goes inside se-ray comes from Ray's own task events
(``ray.timeline()``): engine busy = the engine actor's ``chat``/``generate`` calls,
entailment = the entropy actors' batches; "entailment not overlapped" is the part of the
entailment time during which no engine call was running, as a share of the steady window.

Every run appends one JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NQ_DEV = REPO.parent / "shared" / "data" / "nq_open" / "NQ-open.dev.jsonl"
DEMO = REPO / "se_ray" / "demo" / "nq_open_demo.jsonl"
PARTS = ("reference", "raw", "serray", "early_stop")
LABELS = {
    "reference": "reference loop",
    "raw": "raw vLLM",
    "serray": "se-ray",
    "early_stop": "se-ray early stop",
}


# ----------------------------------------------------------------------------- helpers


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def clip(intervals: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo)]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in union(intervals))


def minus(intervals: list[tuple[float, float]], holes: list[tuple[float, float]]) -> float:
    """Length of ``intervals`` outside ``holes``."""
    return length(intervals) - sum(length(clip(union(intervals), a, b)) for a, b in union(holes))


def rate(n: float, seconds: float | None) -> float | None:
    return round(n / seconds, 4) if seconds else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# ----------------------------------------------------------------------------- memory


class TreeMemory:
    """Peak summed RSS (and PSS, which counts shared pages once) over a process tree, polled.

    ``gcs_address``: also count the processes of that Ray cluster (raylet, workers and their
    children) when the job joins a cluster it did not start.
    """

    def __init__(self, pid: int, gcs_address: str | None = None, interval: float = 1.0, pss_every: int = 5):
        self.pid, self.gcs_address, self.interval, self.pss_every = pid, gcs_address, interval, pss_every
        self.peak_rss = self.peak_pss = 0
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, create_time) -> user+sys seconds
        self._cpu_base: dict[tuple[int, float], float] = {}  # at first sight, for processes older than us
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the processes seen, up to their last poll."""
        return sum(self._cpu.values())

    def _processes(self):
        import psutil

        procs: dict[int, Any] = {}
        roots = []
        try:
            roots.append(psutil.Process(self.pid))
        except psutil.NoSuchProcess:
            return []
        if self.gcs_address:
            for p in psutil.process_iter(["cmdline"]):
                if any(self.gcs_address in arg for arg in (p.info["cmdline"] or [])):
                    roots.append(p)
        for root in roots:
            try:
                for p in [root, *root.children(recursive=True)]:
                    procs[p.pid] = p
            except psutil.NoSuchProcess:
                continue
        return list(procs.values())

    def _run(self) -> None:
        import psutil

        polls = 0
        while not self._stop.is_set():
            rss = pss = 0
            with_pss = polls % self.pss_every == 0  # smaps is slow to read: PSS less often
            polls += 1
            for p in self._processes():
                try:
                    rss += p.memory_info().rss
                    if with_pss:
                        pss += getattr(p.memory_full_info(), "pss", 0)
                    t, key = p.cpu_times(), (p.pid, p.create_time())
                    if key not in self._cpu_base:
                        self._cpu_base[key] = t.user + t.system if key[1] < self._started - 1 else 0.0
                    self._cpu[key] = t.user + t.system - self._cpu_base[key]
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)


# ----------------------------------------------------------------------------- workers
# Each runs in its own subprocess (`--worker PART --spec FILE`) and returns a dict.


def _load_cfg(spec: dict[str, Any]):
    from se_ray.config import load_config

    return load_config(spec["config"], spec["overrides"])


def _questions(spec: dict[str, Any]) -> list[dict[str, Any]]:
    with open(spec["input"]) as f:
        return [json.loads(line) for line in f if line.strip()]


def worker_reference(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from se_ray import entropy
    from se_ray.judges.entailment import Query, are_equivalent, build_judge
    from se_ray.models import resolve_model
    from se_ray.prompts import question_prompt_ids

    cfg = _load_cfg(spec)
    s, e = cfg.sampling, cfg.entailment
    torch.set_num_threads(spec["reference_threads"])
    started = time.perf_counter()
    path = resolve_model(s.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    judge = build_judge(e)
    torch.manual_seed(s.seed)
    load_s = time.perf_counter() - started

    def generate(input_ids, n: int, temperature: float) -> list[tuple[str, float]]:
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else None,
            max_new_tokens=s.max_tokens,
            num_return_sequences=n,
            stop_strings=list(s.stop) or None,
            tokenizer=tokenizer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        # Token log-likelihoods, as the reference keeps them for regular SE.
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        answers = []
        for seq, lp in zip(out.sequences[:, input_ids.shape[1] :], scores, strict=True):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            for stop in s.stop:
                text = text.split(stop)[0]
            keep = seq != tokenizer.pad_token_id
            answers.append((text.strip(), float(lp[keep].sum())))
        return answers

    calls = 0

    def implication(question: str, premise: str, hypothesis: str) -> int:
        nonlocal calls
        if hasattr(judge, "reset_cache"):
            judge.reset_cache()  # one model forward per ordered pair, as the reference
        calls += 1
        return judge.implications([Query(question, premise, hypothesis)])[0]

    def semantic_ids(question: str, answers: list[str]) -> list[int]:
        def equivalent(i: int, j: int) -> bool:  # the reference's are_equivalent: both directions
            forward = implication(question, answers[i], answers[j])
            backward = implication(question, answers[j], answers[i])
            return are_equivalent(forward, backward, e.strict)

        return entropy.semantic_ids(len(answers), equivalent)

    gen_s = entail_s = 0.0
    abstained = 0
    loop_started = time.perf_counter()
    rows = _questions(spec)[: spec.get("reference_limit") or None]
    for done, row in enumerate(rows, 1):
        t0 = time.perf_counter()
        input_ids = torch.tensor([question_prompt_ids(tokenizer, row["question"], s.answer_style)])
        with torch.inference_mode():
            high = generate(input_ids, s.num_samples, s.temperature)
            generate(input_ids, 1, s.standard_temperature)
        t1 = time.perf_counter()
        ids = semantic_ids(row["question"], [a for a, _ in high])
        abstained += entropy.label_with_threshold(entropy.discrete_semantic_entropy(ids), cfg.labeling.tau)
        t2 = time.perf_counter()
        gen_s, entail_s = gen_s + t1 - t0, entail_s + t2 - t1
        elapsed = time.perf_counter() - loop_started
        print(f"reference: {done}/{len(rows)} questions, {elapsed:.1f} s", flush=True)
    loop_s = time.perf_counter() - loop_started
    return {
        "questions": len(rows),
        "model_start_s": round(load_s, 2),
        "steady_s": round(loop_s, 2),
        "generation_s": round(gen_s, 2),
        "entailment_s": round(entail_s, 2),
        "entailment_calls_per_question": round(calls / len(rows), 2),
        "texts_embedded_per_question": round(judge.model_calls / len(rows), 2),
        "entailment_unoverlapped_share": round(entail_s / loop_s, 4),
        "generations_per_question": s.num_samples + 1,
        "abstained": int(abstained),
        "end_time": time.time(),
    }


def worker_raw(spec: dict[str, Any]) -> dict[str, Any]:
    from se_ray.engine import LLMEngineActor
    from se_ray.prompts import question_prompt_ids
    from se_ray.stages.sample import sampling_params

    cfg = _load_cfg(spec)
    s = cfg.sampling
    # The plain class, in this process: the same vllm.LLM arguments and environment as se-ray's actor.
    engine = LLMEngineActor(s)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rows = _questions(spec)
    prompts = [
        TokensPrompt(prompt_token_ids=question_prompt_ids(engine.tokenizer, r["question"], s.answer_style))
        for r in rows
    ]
    params = [SamplingParams(logprobs=0, **sampling_params(s, s.num_samples, s.temperature))] * len(rows) + [
        SamplingParams(logprobs=0, **sampling_params(s, 1, s.standard_temperature))
    ] * len(rows)
    started = time.perf_counter()
    outputs = engine.llm.generate(prompts + prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    engine.shutdown()
    return {
        "questions": len(rows),
        "engine_start_s": round(engine.start_s, 2),
        "steady_s": round(gen_s, 2),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / gen_s, 1),
        "generations_per_question": s.num_samples + 1,
        "end_time": time.time(),
    }


def _timeline_intervals(events: list[dict[str, Any]], lo: float, hi: float) -> dict[str, Any]:
    """Engine calls, entropy batches and engine-ready times from Ray's task events (seconds)."""
    found: dict[str, Any] = {"engine": [], "entropy": [], "sample": [], "engine_ready": []}
    for ev in events:
        cat, name = str(ev.get("cat", "")), ev.get("name")
        if "ts" not in ev or "dur" not in ev or not cat.startswith("task::"):
            continue
        start = float(ev["ts"]) / 1e6
        end = start + float(ev["dur"]) / 1e6
        if end < lo or start > hi:
            continue
        if "LLMEngineActor.__init__" in cat:
            found["engine_ready"].append(end)
        elif "LLMEngineActor." in cat and name in ("chat", "generate"):
            found["engine"].append((start, end))
        elif "MapBatches(EntropyStage)" in cat and name == "submit":
            found["entropy"].append((start, end))
        elif "MapBatches(SampleStage)" in cat and name == "submit":
            found["sample"].append((start, end))
    return found


def worker_serray(spec: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import ray

    from se_ray import columns as col
    from se_ray import entropy
    from se_ray.label import LABELS_DIR, label_job

    cfg = _load_cfg(spec)
    out = Path(spec["output"])
    job_started = time.time()
    summary = label_job(cfg, spec["input"], str(out))
    job_ended = time.time()
    parts = sorted((out / LABELS_DIR).glob("part-*.parquet"), key=lambda p: p.stat().st_mtime)
    last_part = parts[-1].stat().st_mtime if parts else job_ended
    time.sleep(2)  # let the workers flush their task events to the GCS
    spans = _timeline_intervals(ray.timeline(), job_started, job_ended)
    ready = [t for t in spans["engine_ready"] if t >= job_started]
    engine_ready = max(ready) if ready else job_started + summary.get("engine_ready_s", 0.0)
    window = (engine_ready, last_part)
    steady_s = window[1] - window[0]
    engine = clip(spans["engine"], *window)
    entail = clip(spans["entropy"], *window)
    table = pq.read_table(out / LABELS_DIR)
    n = table.num_rows
    generated = sum(table.column(col.NUM_GENERATED).to_pylist())
    clusters = table.column(col.CLUSTER_IDS).to_pylist()
    abstain = table.column(col.ABSTAIN).to_pylist()
    # The early-stop guarantee, checked on the output: every stopped row's label was decided.
    m = cfg.sampling.num_samples
    tau = cfg.labeling.tau
    undecided_stops = sum(
        1
        for ids, a in zip(clusters, abstain, strict=True)
        if len(ids) < m and entropy.label_is_decided(entropy.cluster_counts(ids), m - len(ids), tau) != a
    )
    return {
        "questions": n,
        "engine_start_s": summary.get("engine_ready_s"),
        "engine_reused": not ready,
        "steady_s": round(steady_s, 2),
        "first_part_s": summary.get("first_part_s"),
        "label_wall_s": summary.get("wall_s"),
        "entailment_calls_per_question": summary.get("entailment_calls_per_question"),
        "texts_embedded_per_question": summary.get("entailment_calls_per_question"),
        "engine_busy_share": round(length(engine) / steady_s, 4) if steady_s > 0 else None,
        "entailment_s": round(length(entail), 2),
        "entailment_unoverlapped_s": round(minus(entail, engine), 2),
        "entailment_unoverlapped_share": round(minus(entail, engine) / steady_s, 4) if steady_s > 0 else None,
        "engine_calls": len(spans["engine"]),
        "generations_per_question": round(generated / n, 3) if n else None,
        "abstained": int(sum(abstain)),
        "early_stopped_rows": sum(1 for ids in clusters if len(ids) < m),
        "early_stop_violations": undecided_stops,
        "end_time": job_ended,
    }


WORKERS = {
    "reference": worker_reference,
    "raw": worker_raw,
    "serray": worker_serray,
    "early_stop": worker_serray,  # the same job; its spec adds sampling.early_stop=true
}


def run_worker(part: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = WORKERS[part](spec)
    Path(spec["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def prepare_questions(input_path: str, n: int, dest: Path) -> int:
    from se_ray.config import DataConfig
    from se_ray.data import load_questions

    loaded = load_questions(input_path, DataConfig(limit=n))
    with dest.open("w") as f:
        for r in loaded.rows:
            row = {"id": r["id"], "question": r["question"], "references": r["references"]}
            f.write(json.dumps(row) + "\n")
    return len(loaded.rows)


def launch(part: str, spec: dict[str, Any], workdir: Path, timeout: float, gcs_address: str | None):
    spec = {**spec, "result": str(workdir / f"{part}.result.json"), "output": str(workdir / f"{part}-out")}
    spec_path = workdir / f"{part}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    if part in ("serray", "early_stop") and not gcs_address:
        env.pop("RAY_ADDRESS", None)  # a fresh local cluster: its processes are this subprocess's tree
    log_path = workdir / f"{part}.log"
    started = time.time()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", part, "--spec", str(spec_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        with TreeMemory(proc.pid, gcs_address if part in ("serray", "early_stop") else None) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "timeout"
    result_path = Path(spec["result"])
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{part} failed (rc={rc}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    n = result["questions"]
    e2e_s = result.pop("end_time") - started
    result.update(
        e2e_s=round(e2e_s, 2),
        e2e_qps=rate(n, e2e_s),
        steady_qps=rate(n, result["steady_s"]),
        peak_rss_gb=round(mem.peak_rss / 2**30, 3),
        peak_pss_gb=round(mem.peak_pss / 2**30, 3),
        cpu_s=round(mem.cpu_s, 1),
        cpu_s_per_question=round(mem.cpu_s / n, 2) if n else None,
    )
    return result


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    cols = [
        ("system", None, 0),
        ("e2e q/s", "e2e_qps", 3),
        ("steady q/s", "steady_qps", 3),
        ("start s", "start_s", 1),
        ("e2e s", "e2e_s", 1),
        ("entail calls/q", "entailment_calls_per_question", 1),
        ("entail not overlapped", "entailment_unoverlapped_share", 3),
        ("gens/q", "generations_per_question", 2),
        ("peak RSS GB", "peak_rss_gb", 2),
    ]
    rows = []
    for part, r in results.items():
        r = {**r, "start_s": r.get("engine_start_s", r.get("model_start_s"))}
        rows.append([LABELS[part]] + [fmt(r.get(key), d) for _, key, d in cols[1:]])
    widths = [max(len(c[0]), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c[0].ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    get = lambda part, key: results.get(part, {}).get(key)  # noqa: E731
    out = {
        "serray_vs_reference_steady": ratio(get("serray", "steady_qps"), get("reference", "steady_qps")),
        "serray_vs_reference_e2e": ratio(get("serray", "e2e_qps"), get("reference", "e2e_qps")),
        "serray_vs_raw_steady": ratio(get("serray", "steady_qps"), get("raw", "steady_qps")),
        "serray_vs_raw_e2e": ratio(get("serray", "e2e_qps"), get("raw", "e2e_qps")),
        # time ratio, the form: se-ray end-to-end seconds / raw vLLM end-to-end seconds
        "serray_e2e_time_vs_raw": ratio(get("serray", "e2e_s"), get("raw", "e2e_s")),
        "early_stop_vs_raw_steady": ratio(get("early_stop", "steady_qps"), get("raw", "steady_qps")),
        "early_stop_vs_raw_e2e": ratio(get("early_stop", "e2e_qps"), get("raw", "e2e_qps")),
    }
    if "early_stop" in results:
        full = results["early_stop"].get("full_m")
        saved = results["early_stop"].get("generations_per_question")
        if full and saved is not None:
            out["early_stop_generations_saved_share"] = round(1 - saved / full, 4)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=32, help="questions (default 32: about 8 minutes here)")
    p.add_argument("--num-samples", type=int, default=10, help="M high-temperature samples per question")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--input", default=str(NQ_DEV if NQ_DEV.exists() else DEMO))
    p.add_argument("--out", default=str(REPO / "bench" / "results.jsonl"), help="JSON lines file (appended)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    p.add_argument("--config", help="job YAML (default: the built-in CPU quickstart)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every part (repeatable)",
    )
    p.add_argument(
        "--early-stop-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for the early-stop part only (repeatable)",
    )
    p.add_argument("--ray-address", help="run the se-ray parts on this Ray cluster, not a fresh local one")
    p.add_argument("--reference-limit", type=int, help="the slow reference loop: only the first N questions")
    p.add_argument(
        "--reference-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads of the reference loop (default: every core; its best here)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per part")
    p.add_argument("--workdir", help="keep spec, logs and labels here (default: a temporary folder)")
    p.add_argument("--note", default="", help="free text stored in the JSON line")
    p.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.spec)
        return {}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        raise SystemExit(f"--skip: unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    overrides = [
        *args.overrides,
        f"sampling.num_samples={args.num_samples}",
        f"sampling.max_tokens={args.max_tokens}",
    ]
    from se_ray.config import load_config

    cfg = load_config(args.config, overrides)  # validate once, before anything starts
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="se-ray-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    questions_path = workdir / "questions.jsonl"
    n = prepare_questions(args.input, args.questions, questions_path)
    base = {
        "config": args.config,
        "input": str(questions_path),
        "reference_limit": args.reference_limit,
        "reference_threads": args.reference_threads,
        "overrides": [*overrides, "data.format=jsonl", "data.limit=null"]
        + ([f"ray.address={args.ray_address}"] if args.ray_address else []),
    }
    record: dict[str, Any] = {
        "bench": "label_throughput",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "cpus": os.cpu_count(),
        "git": git_commit(),
        "input": args.input,
        "questions": n,
        "reference_limit": args.reference_limit,
        "reference_threads": args.reference_threads,
        "cpu_reserved_cores": cfg.sampling.cpu_reserved_cores,
        "num_samples": args.num_samples,
        "max_tokens": args.max_tokens,
        "tau": cfg.labeling.tau,
        "judge": f"{cfg.entailment.judge}:{cfg.entailment.model}",
        "overrides": args.overrides,
        "early_stop_overrides": args.early_stop_set,
        "ray_address": args.ray_address,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
    }
    results: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        if part in skip:
            continue
        spec = dict(base)
        if part == "early_stop":
            spec["overrides"] = [*base["overrides"], "sampling.early_stop=true", *args.early_stop_set]
        print(f"[bench] {LABELS[part]}: {n} questions ...", file=sys.stderr, flush=True)
        results[part] = launch(part, spec, workdir, args.timeout, args.ray_address)
        results[part]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        print(f"[bench] {LABELS[part]}: {json.dumps(results[part])}", file=sys.stderr, flush=True)
    if "early_stop" in results:
        results["early_stop"]["full_m"] = args.num_samples + 1
    record.update(results=results, ratios=ratios(results), loadavg_end=[round(x, 2) for x in os.getloadavg()])
    print_table(results)
    print(json.dumps(record["ratios"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[bench] appended to {out}; work files in {workdir}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
