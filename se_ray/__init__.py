"""se-ray: fine-tune LLMs to abstain where semantic entropy says they would hallucinate.

Importing the package loads no torch, vllm, deepspeed or ray.
"""

__version__ = "0.1.0"
