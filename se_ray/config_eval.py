"""The evaluation section of the job config: judges, abstention scores and the certified dial
(composed in ``se_ray.config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from se_ray.config_base import OPERATIONAL, Section


class EvalConfig(Section):
    judge: Literal["contains", "f1", "exact", "llm"] = Field(
        "contains",
        description="contains: a reference occurs as whole tokens in the answer (no hedging); f1: max "
        "SQuAD F1 >= f1_threshold; exact: normalised match or containment; llm: the reference yes/no prompt.",
    )
    f1_threshold: float = Field(0.5, ge=0, le=1)
    judge_model: str = Field("", description="LLM judge model; '' means the sampling model.")
    bootstrap_samples: int = Field(1000, ge=0)
    max_tokens: int | None = Field(None, ge=1, description="Defaults to sampling.max_tokens.")
    judge_temperature: float = Field(0.01, gt=0, description="LLM judge: first try (reference: 0.01).")
    judge_retry_temperature: float = Field(
        1.0, gt=0, description="LLM judge: one retry when the reply holds neither yes nor no."
    )
    judge_max_tokens: int = Field(10, ge=1, description="LLM judge: reply length (the whole reply is read).")
    judge_tensor_parallel_size: int | None = Field(
        None,
        ge=1,
        description="Tensor parallelism of a separate judge model's engine (judge_model set); "
        "None: sampling.tensor_parallel_size.",
        json_schema_extra=OPERATIONAL,
    )
    scores: list[Literal["se_score", "abstain_logprob"]] = Field(
        default_factory=list,
        description="Abstention scores per question in results.parquet: se_score (semantic entropy of "
        "sampling.num_samples samples of the evaluated model, clustered by the entailment judge), "
        "abstain_logprob (teacher-forced log-prob of labeling.abstention_text after the prompt).",
    )
    risk_alpha: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Certified dial: the share of questions answered wrongly allowed.",
        json_schema_extra=OPERATIONAL,
    )
    risk_delta: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Certified dial: the risk bound may fail with at most this probability.",
        json_schema_extra=OPERATIONAL,
    )
    risk_p_value: Literal["binomial", "hoeffding_bentkus"] = Field(
        "binomial",
        description="Certified dial: the p-value (exact binomial tail, or LTT's Hoeffding-Bentkus).",
        json_schema_extra=OPERATIONAL,
    )
    risk_guarantee: Literal["population", "test_split"] = Field(
        "population",
        description="Certified dial: what the bound is on. population: the risk on new questions "
        "exchangeable with the calibration ones (risk_p_value). test_split: the risk on the evaluated "
        "test questions themselves (se-ray run's test split, se-ray evaluate's input), calibration "
        "and test being one pool split at random (a hypergeometric p-value; risk_p_value unused).",
        json_schema_extra=OPERATIONAL,
    )
    calibration_input: str | None = Field(
        None,
        description="se-ray evaluate: labelled questions to certify each score's threshold on "
        "(se-ray run uses its validation split).",
        json_schema_extra=OPERATIONAL,
    )
