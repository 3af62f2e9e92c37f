"""se_ray.train.worker, the pieces that need no Ray Train group: optimizer groups and dtypes."""

from __future__ import annotations

from types import SimpleNamespace

from se_ray.train.weights import config_dtype, param_groups
from se_ray.train.worker import Progress


def test_biases_and_norms_get_no_weight_decay():
    import torch

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False)
    )
    model[0].weight.requires_grad_(False)  # frozen weights are left to the base model
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(2, 4)]
    assert sorted(tuple(p.shape) for p in groups[1]["params"]) == [(4,), (4,), (4,)]


def test_zero3_partitioned_parameters_are_grouped_by_their_full_shape():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for p in model.parameters():  # what zero.Init leaves: an empty local tensor, the shape aside
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    groups = param_groups(model, weight_decay=0.1)
    assert [(g["weight_decay"], len(g["params"])) for g in groups] == [(0.1, 1), (0.0, 3)]


def test_an_empty_group_is_left_out():
    import torch

    groups = param_groups(torch.nn.LayerNorm(4), weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.0]


def test_config_dtype_reads_either_spelling():
    import torch

    assert config_dtype(SimpleNamespace(dtype="bfloat16")) is torch.bfloat16
    assert config_dtype(SimpleNamespace(torch_dtype=torch.float16)) is torch.float16
    assert config_dtype(SimpleNamespace()) is torch.float32


def test_a_fresh_run_starts_at_the_beginning():
    progress = Progress()
    assert (progress.step, progress.epoch, progress.micro, progress.attempt) == (0, 0, 0, 0)
    assert progress.restored_from is None and progress.history == []
