"""Shared fixtures: tiny models built from configs, a locally trained tokenizer, synthetic shards."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Under `pytest -n N` (the README's test command) each worker, and every process its tests start,
    computes on one thread: N workers with a pool of N threads each would thrash the machine's N cores."""
    if hasattr(config, "workerinput"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Files with the most slow tests first (the longest jobs first: with `--dist loadfile` each file goes whole to
    one worker, and a heavy file handed out last would keep one worker busy while the other idles); the order
    within a file is kept."""
    slow_per_file = {}
    for item in items:
        slow_per_file[item.path] = slow_per_file.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow_per_file[item.path])


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """Small synthetic shards (shared by the data and training tests)."""
    from data.synthetic import SyntheticConfig, ensure_generated

    root = tmp_path_factory.mktemp("synthetic") / "shapes"
    cfg = SyntheticConfig(seed=0, n_train=240, n_val=60, image_size=64, turns_per_image=6, samples_per_shard=80)
    ensure_generated(root, cfg, progress=False)
    return root, cfg


@pytest.fixture(scope="session")
def task_tokenizer(tmp_path_factory):
    from data.chat import TEMPLATES
    from data.synthetic import all_texts
    from data.tokenizer import load_or_train, template_corpus

    corpus = template_corpus(TEMPLATES["vicuna"], "", all_texts())
    return load_or_train(tmp_path_factory.mktemp("tok") / "tokenizer", lambda: corpus, 1024)


@pytest.fixture
def restore_environ():
    """Put os.environ back as it was: an in-process Lightning DDP run sets LOCAL_RANK / NODE_RANK, which
    would make every later multi-process run in this session wait for ranks it never starts."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
