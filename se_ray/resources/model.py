"""What an actor needs on a GPU, and what the known GPUs and machines have: pure arithmetic,
no ray or torch (``se-ray plan`` and ``tests/unit/test_manifests.py`` both rest on it).

Memory per GPU, in GB (1e9 bytes): model weights at their dtype, vLLM's KV cache inside its
``gpu_memory_utilization`` budget, DeBERTa-style NLI activations, and one ZeRO-2 training
worker (weights, sharded optimizer states, activations without recomputation, fp32 logits).
Throughputs are assumptions for the GPU-hour estimate, never measured here: the plan prints them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GB = 1e9


@dataclass(frozen=True)
class Arch:
    """A transformer's sizes, as its config.json on the Hugging Face Hub gives them."""

    params_b: float  # billions of parameters
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int


MODELS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": Arch(8.03, 32, 4096, 32, 8, 128, 128256, 14336),
    "meta-llama/Meta-Llama-3-70B-Instruct": Arch(70.55, 80, 8192, 64, 8, 128, 128256, 28672),
    "microsoft/deberta-v2-xlarge-mnli": Arch(0.886, 24, 1536, 24, 24, 64, 128100, 6144),
}


def arch_from_hf_config(config: Mapping[str, Any]) -> Arch:
    """A decoder's sizes from its config.json (Llama-style: gated MLP, grouped KV heads); the
    parameter count is counted from the shapes (embeddings twice unless tied)."""
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    vocab, inter = config["vocab_size"], config["intermediate_size"]
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    per_layer = attention + 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    params = layers * per_layer + embeddings
    return Arch(params / 1e9, layers, hidden, heads, kv_heads, head_dim, vocab, inter)


@dataclass(frozen=True)
class Gpu:
    """One GPU model: its memory, the Ray accelerator type Ray gives its nodes, and the throughputs
    the GPU-hour estimate assumes (vLLM batched decoding of an 8B bf16 model; dense bf16 peak)."""

    memory_gb: float  # as sold; usable memory is 1-3% less, which the reserves below absorb
    ray_type: str  # ray.util.accelerators: the node resource accelerator_type:<ray_type>
    decode_tokens_per_s_8b: float
    bf16_tflops: float


GPUS = {
    "H100-80GB": Gpu(80.0, "H100", 10_000, 989),
    "A100-80GB": Gpu(80.0, "A100", 6_000, 312),
    "A100-40GB": Gpu(40.0, "A100", 5_000, 312),
    "L4": Gpu(24.0, "L4", 1_200, 121),
}
# Instance / machine type -> (GPU model, GPUs, vCPUs, RAM in GiB), from the clouds' spec sheets.
INSTANCES: dict[str, tuple[str | None, int, int, int]] = {
    "p5.48xlarge": ("H100-80GB", 8, 192, 2048),
    "p4d.24xlarge": ("A100-40GB", 8, 96, 1152),
    "p4de.24xlarge": ("A100-80GB", 8, 96, 1152),
    "g6.xlarge": ("L4", 1, 4, 16),
    "g6.2xlarge": ("L4", 1, 8, 32),
    "a3-highgpu-8g": ("H100-80GB", 8, 208, 1743),  # 1872 GB
    "a2-highgpu-8g": ("A100-40GB", 8, 96, 633),  # 680 GB
    "a2-ultragpu-8g": ("A100-80GB", 8, 96, 1266),  # 1360 GB
    "g2-standard-8": ("L4", 1, 8, 29),  # 32 GB
    "m7i.2xlarge": (None, 0, 8, 32),  # the CPU heads
    "n2-standard-8": (None, 0, 8, 32),
}
# Node labels of NVIDIA GPU feature discovery (nvidia.com/gpu.product), and of GKE, -> GPU model.
GPU_PRODUCTS = {
    "NVIDIA-H100-80GB-HBM3": "H100-80GB",
    "NVIDIA-A100-SXM4-40GB": "A100-40GB",
    "NVIDIA-A100-SXM4-80GB": "A100-80GB",
    "NVIDIA-L4": "L4",
    "nvidia-h100-80gb": "H100-80GB",
    "nvidia-tesla-a100": "A100-40GB",
    "nvidia-a100-80gb": "A100-80GB",
    "nvidia-l4": "L4",
}
# A live node's accelerator_type:<type> resource -> GPU model (A100: the 40 GB one, the smaller).
RAY_TYPES = {
    "H100": "H100-80GB",
    "A100": "A100-40GB",
    "A100-40G": "A100-40GB",
    "A100-80G": "A100-80GB",
    "L4": "L4",
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "auto": 2, "float32": 4}
CUDA_CONTEXT_GB = 1.0  # per process: CUDA context, cuBLAS/NCCL workspaces
VLLM_ACTIVATION_GB = 2.0  # vLLM's profiled peak activations, sampler and CUDA graphs at 1k context
PROMPT_TOKENS = 64  # chat template + question (NQ questions are short)
TRAIN_MFU = 0.3  # assumed share of the bf16 peak a training step reaches
TRAIN_HEADROOM = 0.95  # a training worker may fill this share of its GPU


def weights_gb(arch: Arch, dtype: str = "bfloat16") -> float:
    return arch.params_b * 1e9 * DTYPE_BYTES.get(dtype, 2) / GB


def kv_bytes_per_token(arch: Arch, dtype: str = "bfloat16") -> float:
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * DTYPE_BYTES.get(dtype, 2)  # K and V


def vllm_kv_gb(arch: Arch, gpu_mem_gb: float, utilization: float, tp: int, dtype: str = "bfloat16") -> float:
    """KV cache left per GPU once the weights shard and activations are in vLLM's budget."""
    return utilization * gpu_mem_gb - weights_gb(arch, dtype) / tp - VLLM_ACTIVATION_GB


def vllm_fits(
    arch: Arch, gpu_mem_gb: float, utilization: float, tp: int, tokens: int, dtype: str = "bfloat16"
) -> bool:
    """Whether the engine starts and holds ``tokens`` tokens of KV cache (vLLM refuses to start
    when the cache cannot hold one max_model_len sequence; the plan asks for one question's samples)."""
    need = tokens * kv_bytes_per_token(arch, dtype) / tp
    return vllm_kv_gb(arch, gpu_mem_gb, utilization, tp, dtype) * GB >= need


def vllm_min_gpu_gb(arch: Arch, utilization: float, tp: int, tokens: int, dtype: str = "bfloat16") -> float:
    """The smallest GPU (GB) on which ``vllm_fits`` holds: vllm_fits solved for the GPU's memory."""
    kv = tokens * kv_bytes_per_token(arch, dtype) / tp / GB
    return (weights_gb(arch, dtype) / tp + VLLM_ACTIVATION_GB + kv) / utilization


def tp_lower_bound(arch: Arch, gpu_mem_gb: float, dtype: str = "bfloat16") -> int:
    """Weights alone: the fewest GPUs (power of two) whose memory holds the weights."""
    return 2 ** math.ceil(math.log2(max(1.0, weights_gb(arch, dtype) / gpu_mem_gb)))


def judge_tp_needed(arch: Arch, gpu_mem_gb: float, max_model_len: int, utilization: float = 0.9) -> int:
    """The smallest power-of-two tensor parallelism with which the vLLM engine fits (64 at most)."""
    tp = tp_lower_bound(arch, gpu_mem_gb)
    while tp < 64 and not vllm_fits(arch, gpu_mem_gb, utilization, tp, max_model_len):
        tp *= 2
    return tp


def nli_gb(arch: Arch, model_batch_size: int, max_answer_tokens: int) -> float:
    """An NLI actor: fp32 weights (loaded at the model's saved dtype) + inference activations.
    A pair is "{question} {answer_a}" [SEP] "{question} {answer_b}". Peak activations: the
    attention scores of one layer (DeBERTa adds content-to-position and position-to-content
    terms: 3 score matrices) plus a few hidden-state copies."""
    seq = 2 * (PROMPT_TOKENS + max_answer_tokens)
    scores = model_batch_size * arch.heads * seq * seq * 4 * 3
    hidden = model_batch_size * seq * max(arch.hidden, arch.intermediate) * 4 * 4
    return weights_gb(arch, "float32") + (scores + hidden) / GB + CUDA_CONTEXT_GB


def lora_params(arch: Arch, r: int, modules: list[str]) -> int:
    a = arch
    kv = a.kv_heads * a.head_dim
    shapes = {
        "q_proj": (a.hidden, a.heads * a.head_dim),
        "k_proj": (a.hidden, kv),
        "v_proj": (a.hidden, kv),
        "o_proj": (a.heads * a.head_dim, a.hidden),
        "gate_proj": (a.hidden, a.intermediate),
        "up_proj": (a.hidden, a.intermediate),
        "down_proj": (a.intermediate, a.hidden),
    }
    return a.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules if m in shapes)


def trainable_params(arch: Arch, method: str, lora_r: int, modules: list[str]) -> float:
    return arch.params_b * 1e9 if method == "full" else lora_params(arch, lora_r, modules)


def train_gb(
    arch: Arch,
    *,
    method: str,
    lora_r: int,
    modules: list[str],
    workers: int,
    zero_stage: int,
    seq: int,
    batch: int,
) -> float:
    """One ZeRO worker (bf16 weights replicated, or sharded under ZeRO-3; grads + fp32 Adam states of
    the trainable parameters sharded over the workers) + activations without recomputation
    (Korthikanti et al. 2022: s*b*h*L*(34 + 5*a*s/h) bytes) + fp32 logits and their gradient."""
    a = arch
    states = (2 + 12) * trainable_params(arch, method, lora_r, modules) / workers
    activations = seq * batch * a.hidden * a.layers * (34 + 5 * a.heads * seq / a.hidden)
    logits = 2 * batch * seq * a.vocab * 4
    weights = weights_gb(arch) / (workers if zero_stage == 3 else 1)
    return weights + (states + activations + logits) / GB + CUDA_CONTEXT_GB


def decode_tokens_per_s(gpu: Gpu, arch: Arch | None) -> float:
    """Assumed generated tokens/s of one engine per GPU: decoding reads the weights once per step,
    so it scales inversely with the model's size (from the 8B figure)."""
    return gpu.decode_tokens_per_s_8b * (8.03 / arch.params_b if arch else 1.0)


def train_tokens_per_s(gpu: Gpu, arch: Arch, method: str) -> float:
    """Assumed training tokens/s of one worker: FLOPs per token 6N (full) or 4N (LoRA: no weight
    gradients) at TRAIN_MFU of the bf16 peak."""
    flops_per_token = (6 if method == "full" else 4) * arch.params_b * 1e9
    return gpu.bf16_tflops * 1e12 * TRAIN_MFU / flops_per_token
