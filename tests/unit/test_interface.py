"""The public interface stays: every verb and option of `se-ray ... --help` and the label
schema, as recorded before the restructuring (tests/data/interface/), are still there."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from se_ray import columns as col

RECORDED = Path(__file__).resolve().parents[1] / "data" / "interface"
VERBS = ["", "label", "train", "evaluate", "run", "prepare-models"]


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", help_text))


@pytest.mark.parametrize("verb", VERBS)
def test_help_keeps_every_recorded_option(verb):
    args = [verb] if verb else []
    out = subprocess.run(
        [sys.executable, "-m", "se_ray.cli", *args, "--help"], capture_output=True, text=True, check=True
    )
    recorded = (RECORDED / f"help_{verb or 'main'}.txt").read_text()
    assert _options(recorded) <= _options(out.stdout), _options(recorded) - _options(out.stdout)
    if not verb:
        for name in ("label", "train", "evaluate", "run", "prepare-models"):
            assert name in out.stdout


def test_label_schema_is_unchanged():
    recorded = (RECORDED / "label_schema.txt").read_text().strip()
    assert col.label_schema().to_string(show_schema_metadata=False).strip() == recorded
