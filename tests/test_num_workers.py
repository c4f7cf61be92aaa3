"""`data.num_workers: auto` (the data=shards default) starts no more loader workers than the machine has."""

import os
import warnings

import pytest
from hydra import compose, initialize_config_dir

from data.datamodule import MLLMDataModule
from data.workers import resolve_num_workers
from tests.test_pareto import CONF
from train.builders import build


def shards_data_module(cores, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["data=shards", "data.source.train=a.tar", "data.source.val=b.tar"])
    data = build(cfg.data, "data")
    return MLLMDataModule([], [], encoder=None, pad_id=0, num_workers=data.num_workers)  # as train.builders.build_data does


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 1), (3, 2), (16, 4)])
def test_shards_default_leaves_a_core_to_training(cores, workers, monkeypatch):
    assert shards_data_module(cores, monkeypatch).num_workers == workers


def test_auto_workers_do_not_trigger_pytorchs_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "This DataLoader will create N worker processes ..."
        MLLMDataModule([], [], encoder=None, pad_id=0, num_workers="auto").train_dataloader()


@pytest.mark.parametrize("value", ["many", -1, 1.5, True])
def test_bad_num_workers_names_the_setting(value):
    with pytest.raises(ValueError, match=r"data.num_workers must be a count >= 0 or 'auto'"):
        resolve_num_workers(value)
