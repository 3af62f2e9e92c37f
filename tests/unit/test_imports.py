"""Import hygiene: no se-ray module loads a heavy framework at import (the CLI answers fast, and
configs and math load anywhere); the heavy imports live inside the functions that need them."""

import pkgutil
import subprocess
import sys

import se_ray

HEAVY = ("torch", "vllm", "ray", "deepspeed", "transformers", "peft", "scipy")
MODULES = sorted(m.name for m in pkgutil.walk_packages(se_ray.__path__, "se_ray."))


def test_every_module_imports_without_a_heavy_framework():
    code = (
        f"import importlib, sys\nfor m in {MODULES!r}: importlib.import_module(m)\n"
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"heavy frameworks loaded at import: {out.stdout.strip()}"
    assert len(MODULES) > 20  # the walk found the package, subpackages included


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "se_ray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("label", "train", "evaluate", "run"):
        assert verb in out.stdout
