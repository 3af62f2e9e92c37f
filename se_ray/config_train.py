"""The training and τ-sweep sections of the job config (composed in ``se_ray.config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from se_ray.config_base import OPERATIONAL, Section

PAPER_TAU_GRID = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]


class TrainConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0, json_schema_extra=OPERATIONAL)
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type of the training workers' nodes (e.g. H100), passed as "
        "ScalingConfig(accelerator_type=...); None: any node.",
        json_schema_extra=OPERATIONAL,
    )
    zero_stage: Literal[2, 3] = 2
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    learning_rate: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    global_batch_size: int = Field(48, ge=1)
    micro_batch_size: int = Field(4, ge=1, description="Per worker per step.")
    epochs: int = Field(7, ge=1)
    warmup_ratio: float = Field(0.2, ge=0, lt=1, description="The paper's 'cosine with a cycle of 0.2'.")
    max_length: int = Field(256, ge=8)
    gradient_clipping: float = Field(1.0, ge=0, description="Max global gradient norm; 0 disables clipping.")
    shuffle_buffer: int = Field(
        0,
        ge=0,
        description="Rows in each worker's local shuffle buffer (seeded per epoch); 0 keeps stream order.",
    )
    seed: int = 0
    checkpoint_every_steps: int | None = Field(None, ge=1, json_schema_extra=OPERATIONAL)
    num_to_keep: int = Field(2, ge=1, json_schema_extra=OPERATIONAL)
    max_failures: int = Field(0, ge=0, json_schema_extra=OPERATIONAL)
    export_merged: bool = Field(
        True,
        description="Export merged/ (the base with the trained weights merged in, in the base's dtype) "
        "once, for the chosen model, from a Ray task with the training workers' resources; LoRA trials "
        "of `se-ray run` export only their adapter. Full fine-tuning always exports it.",
    )
    select_checkpoint: Literal["last", "label_rate"] = Field(
        "last",
        description="last: export the last step; label_rate: the probed step whose greedy answers to "
        "held-out questions abstain at the rate closest to the training labels' (se_ray/train/selection.py).",
    )
    select_every_steps: int | None = Field(
        None, ge=1, description="label_rate: probe every N optimizer steps, besides each epoch's end."
    )
    select_questions: str | None = Field(
        None,
        description="label_rate: the held-out questions file `se-ray train` probes with; "
        "`se-ray run` probes with its validation split.",
    )
    select_batch_size: int = Field(
        32,
        ge=1,
        description="label_rate: prompts each worker decodes per generate call of the probe.",
        json_schema_extra=OPERATIONAL,
    )


class SweepConfig(Section):
    taus: list[float] = Field(default_factory=lambda: list(PAPER_TAU_GRID))
    tau_margin: float = Field(
        0.0,
        ge=0,
        description="Drop from each entropy method's training set the questions whose score lies within "
        "this margin of tau (|score - tau| <= margin), whose labels are the noisiest; 0 keeps all.",
    )
    seeds: int = Field(1, ge=1, description="Retrain the chosen tau with this many seeds.")
    methods: list[Literal["semantic_entropy", "r_tuning", "exact_entropy"]] = Field(
        default_factory=lambda: ["semantic_entropy", "r_tuning", "exact_entropy"]
    )
    max_concurrent_trials: int = Field(
        1, ge=1, description="Ray Tune trials at once (each trial trains with train.num_workers workers)."
    )
    trial_num_cpus: float = Field(
        0.5,
        ge=0,
        description="CPUs reserved by each Tune trial's own function (it launches the trainer, waits, "
        "then validates through the engines). Above 0 it can only run on a node with CPUs for work, "
        "never on a head started with num_cpus=0; 0 reserves none (it may then land anywhere).",
    )
