"""bench/recipe_dev.py tunes the training recipe on questions that no split of the run holds."""

import importlib.util

from se_ray import columns as col
from se_ray.config import load_config
from se_ray.data import load_questions
from se_ray.run.plan import split_rows
from tests.conftest import REPO


def _recipe_dev():
    spec = importlib.util.spec_from_file_location("recipe_dev", REPO / "bench" / "recipe_dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dev_questions_are_scorable_and_outside_every_split_of_the_seed():
    recipe_dev = _recipe_dev()
    for seed in (0, 1):
        cfg = load_config(recipe_dev.CONFIG, [f"split.seed={seed}"])
        rows = load_questions(cfg.input, cfg.data, cfg.storage).rows
        dev = recipe_dev.dev_questions(rows, cfg, 200)
        used = {r[col.ID] for part in split_rows(rows, cfg.split).values() for r in part}
        ids = [r[col.ID] for r in dev]
        assert len(ids) == len(set(ids)) == 200
        assert not used & set(ids)
        assert all(col.is_scorable(r) for r in dev)
        assert any(not col.is_answerable(r) for r in dev)  # the made-up places come along
        assert ids == [r[col.ID] for r in recipe_dev.dev_questions(rows, cfg, 200)]
