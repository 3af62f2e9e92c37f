"""Import hygiene: the package, its config and math load no heavy framework (the CLI answers fast)."""

import subprocess
import sys

HEAVY = ("torch", "vllm", "ray", "deepspeed", "transformers", "peft")


def _loaded_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_light_modules_import_no_heavy_framework():
    loaded = _loaded_after(
        "import se_ray, se_ray.config, se_ray.entropy, se_ray.metrics, se_ray.cli, se_ray.prompts, "
        "se_ray.columns, se_ray.models, se_ray.train"
    )
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "se_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("label", "train", "evaluate", "run"):
        assert verb in out.stdout
