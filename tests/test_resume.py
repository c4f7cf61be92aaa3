"""Resume that loses nothing: a run killed with SIGKILL and resumed continues the uninterrupted run's
loss curve step for step; the data stream continues exactly (workers, shuffle buffer, corrupt samples);
checkpoint saves are atomic; ckpt_path values resolve or fail clearly."""

import csv
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data.pipeline import ShardStream
from data.stream_position import StreamPosition
from models.config import ConfigError
from train.infra import resume
from train.infra.checkpoint_io import AtomicCheckpointIO
from train.infra.resume import PeriodicCheckpoint, commit, resolve_ckpt_path

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 12, 5  # an odd checkpoint step: with 2 workers the resumed loader must start at worker 1
TINY = [
    "run_name=resume", "trainer.accelerator=cpu", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
    "trainer.log_every_n_steps=1", f"callbacks.last.every_n_train_steps={EVERY}",
    "data.source.n_train=32", "data.source.n_val=8", "data.batch_size=4", "data.num_workers=2", "data.shuffle_buffer=16",
    "model.config.text.num_hidden_layers=2", "export=false", "eval.noimage=false",
]



# --- the real thing: SIGKILL, resume, same losses ----------------------------------------------------------
def train_cmd(tmp_path: Path, run: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / run}", *TINY, *overrides]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: bitwise-reproducible CPU maths


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.05)


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


MODELS = {  # + InternVL's tiles, + Qwen2-VL's grids of two sizes per batch (M-RoPE), + MobileVLM V2
    "tiny": ["model.config.vision.num_hidden_layers=2"],
    "tiny_internvl": ["model=tiny_internvl", "data=synthetic_hires", "model.config.vision.num_hidden_layers=2"],
    "tiny_qwen2vl": ["model=tiny_qwen2vl", "data=synthetic_hires", "model.config.vision.depth=2"],
    "tiny_mobilevlm": ["model=tiny_mobilevlm", "model.config.vision.num_hidden_layers=2"],  # LDPv2's pooled grid
}


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])  # 2: the training loader reads each step's micro-batches ahead
def test_killed_run_resumes_on_the_same_loss_curve(tmp_path, accumulate):
    """The machinery every family shares (loader position, RNG states, optimizer, schedule), on the default model;
    each family's own batches are resumed below, packed (its heaviest path)."""
    assert_killed_run_resumes(tmp_path, [f"trainer.accumulate_grad_batches={accumulate}", *MODELS["tiny"]])


@pytest.mark.slow
def test_killed_qwen3_vl_moe_run_resumes_on_the_same_loss_curve(tmp_path):
    """Qwen3-VL-MoE (DeepStack, a Qwen3-MoE LLM whose load-balancing loss is part of every step's objective),
    under accumulation: one variant only, the machinery is the families' shared one above."""
    assert_killed_run_resumes(tmp_path, ["trainer.accumulate_grad_batches=2", "model=tiny_qwen3vl_moe", "data=synthetic_hires",
                                         "model.config.vision.depth=2"])


@pytest.mark.slow
def test_killed_qwen3_5_moe_run_resumes_on_the_same_loss_curve(tmp_path):
    """Qwen3.5-MoE (linear-attention layers whose recurrence runs per sample, a gated-attention layer, MoE FFNs with
    a shared expert), under accumulation: one variant, the machinery is the families' shared one above."""
    assert_killed_run_resumes(tmp_path, ["trainer.accumulate_grad_batches=2", "model=tiny_qwen35_moe", "data=synthetic_hires",
                                         "model.config.vision.depth=2", "model.config.text.num_hidden_layers=4"])


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_killed_packed_run_resumes_on_the_same_loss_curve(tmp_path, model):
    """data.packing=true (data/packing.py): a buffer's packs are rebuilt on resume and its taken batches skipped
    (packed under accumulation: the routed run below)."""
    assert_killed_run_resumes(tmp_path, ["data.packing=true", "data.max_length=1024", "data.pack_buffer=10", *MODELS[model]])
    with open(tmp_path / "uninterrupted" / "csv" / "metrics.csv") as f:
        per_row = [float(r["data/samples_per_pack"]) for r in csv.DictReader(f) if r.get("data/samples_per_pack")]
    assert len(per_row) >= STEPS and min(per_row) > 1  # every batch packed several samples into a row


@pytest.mark.slow
def test_killed_routed_run_resumes_on_the_same_loss_curve(tmp_path):
    """arch=pmod (routers trained from zero in their own optimizer group) on packed rows under accumulation."""
    assert_killed_run_resumes(tmp_path, ["arch=pmod", "data.packing=true", "data.max_length=1024", "data.pack_buffer=10",
                                         "trainer.accumulate_grad_batches=2", *MODELS["tiny"]])


def assert_killed_run_resumes(tmp_path: Path, extra: list[str]) -> None:
    """A run with `extra` overrides killed after its first checkpoint and resumed trains the uninterrupted run's steps."""
    reference = subprocess.Popen(train_cmd(tmp_path, "uninterrupted", *extra), cwd=ROOT, env=env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(tmp_path / "uninterrupted" / "csv", reference)  # data and tokenizer are ready: share them
        killed = subprocess.Popen(train_cmd(tmp_path, "run", *extra), cwd=ROOT, env=env(), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        last = tmp_path / "run" / "checkpoints" / "last.ckpt"
        wait_for(last, killed)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
        out, _ = reference.communicate(timeout=600)
        assert reference.returncode == 0, out[-3000:]
    finally:
        for p in (reference, locals().get("killed")):
            if p is not None and p.poll() is None:
                p.kill()
    assert not (tmp_path / "run" / "metrics.json").exists()  # it really died mid-training
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step in range(EVERY, STEPS, EVERY)

    # the same command again: ckpt_path=auto finds the run directory's last.ckpt
    resumed = subprocess.run(train_cmd(tmp_path, "run", *extra), cwd=ROOT, env=env(), text=True, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr + resumed.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == STEPS

    expected, got = train_losses(tmp_path / "uninterrupted"), train_losses(tmp_path / "run")
    assert sorted(expected) == list(range(STEPS))
    assert sorted(got) == list(range(step, STEPS))  # exactly the steps after the checkpoint, once each
    diffs = [abs(got[s] - expected[s]) for s in got]
    print(f"resumed at step {step}: max |loss diff| over {len(diffs)} steps = {max(diffs):.3g}")
    assert max(diffs) <= 1e-6, {s: (expected[s], got[s]) for s in got}


def test_the_padding_fraction_counts_every_attempt_of_a_resumed_run():
    """data/padding_fraction is the padded share of all training tokens so far: a run resumed from a checkpoint
    (a requeued job) continues the counts instead of starting them again at its first batch."""
    from types import SimpleNamespace

    from data.datamodule import MLLMDataModule

    def module() -> MLLMDataModule:
        dm = MLLMDataModule([], [], encoder=None, pad_id=0, num_workers=0)
        dm.trainer = SimpleNamespace(world_size=1, global_rank=0, training=True)
        dm.position = StreamPosition.start(1)
        return dm

    first = module()
    for padding, tokens in ((3, 40), (1, 40)):
        first.on_before_batch_transfer(SimpleNamespace(stream_pos=None, n_padding=padding, n_tokens=tokens), 0)
    resumed = module()
    resumed.load_state_dict(first.state_dict())
    resumed.on_before_batch_transfer(SimpleNamespace(stream_pos=None, n_padding=6, n_tokens=40), 0)
    assert resumed.padding_fraction == (3 + 1 + 6) / 120


# --- the data stream continues exactly -----------------------------------------------------------------------
def parse(raw: dict) -> dict:
    record = json.loads(raw["json"])  # raises on the corrupt members
    return {"key": raw["__key__"], "value": record["v"]}


def collate(samples: list[dict]) -> dict:
    return {"keys": [s["key"] for s in samples], "n_skipped": sum(s["n_skipped"] for s in samples),
            "stream_pos": samples[-1]["stream_pos"]}


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("mixed")
    urls = []
    for shard in range(3):
        urls.append(str(root / f"train-{shard:06d}.tar"))
        with wds.TarWriter(urls[-1]) as w:
            for i in range(11):
                key = f"s{shard}-{i:02d}"
                w.write({"__key__": key, "json": b"{broken" if i % 4 == 3 else json.dumps({"v": i}).encode()})
    return urls


def batches(urls, workers: int, start: StreamPosition | None = None):
    ds = ShardStream(urls, parse, seed=5, shuffle_buffer=7, infinite=True, start=start)
    return iter(DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate))


def assert_continues_exactly(make_stream, workers: int, consumed: int, later: int) -> StreamPosition:
    """`make_stream(start)` resumed at the position after `consumed` batches yields the next `later`
    batches of the uninterrupted stream (keys and corrupt-sample counts); returns that position."""
    stream = make_stream(None)
    position = StreamPosition.start(max(1, workers))
    for batch in itertools.islice(stream, consumed):
        position = position.after(batch["stream_pos"])
    expected = [(b["keys"], b["n_skipped"]) for b in itertools.islice(stream, later)]
    got = [(b["keys"], b["n_skipped"]) for b in itertools.islice(make_stream(position), later)]
    assert got == expected
    assert sum(n for _, n in expected) > 0  # corrupt samples were met and counted after the position
    return position


@pytest.mark.parametrize("workers,rank,consumed", [(0, 0, 9), (2, 1, 7), (2, 0, 12)])
def test_stream_continues_exactly_from_a_position(mixed_shards, monkeypatch, workers, rank, consumed):
    """Across epochs, with a shuffle buffer, corrupt samples, 2 ranks and a loader whose 2 workers take
    turns: the batches after a position are the uninterrupted stream's, corrupt-sample counts included."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    position = assert_continues_exactly(lambda start: batches(mixed_shards, workers, start), workers, consumed, later=10)
    assert max(epoch for epoch, _ in position.positions) >= 1  # the position lies past an epoch boundary
    assert StreamPosition.from_tensor(position.to_tensor()) == position


def test_stream_refuses_a_position_for_another_worker_count(mixed_shards):
    with pytest.raises(ValueError, match="data.num_workers"):
        next(batches(mixed_shards, 0, StreamPosition.start(2)))


# --- RNG state --------------------------------------------------------------------------------------------
def test_rng_states_round_trip_through_a_safe_checkpoint():
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's generator
    np.random.randn()
    buf = io.BytesIO()
    torch.save(resume.rng_state(), buf)
    draws = lambda: (torch.rand(4).tolist(), random.random(), random.gauss(0, 1), np.random.randn(3).tolist())
    before = draws()
    draws()
    buf.seek(0)
    resume.set_rng_state(torch.load(buf, weights_only=True))
    assert draws() == before


# --- atomic saves ------------------------------------------------------------------------------------------
class Explodes:
    """Serialising this raises: torch.save has written part of the archive by then."""

    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 5, "w": torch.arange(4.0)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        io_.save_checkpoint({"global_step": 10, "w": torch.zeros(1 << 20), "z": Explodes()}, path)
    ckpt = io_.load_checkpoint(path, weights_only=True)
    assert ckpt["global_step"] == 5 and torch.equal(ckpt["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_directory_checkpoints_are_swapped_in_whole(tmp_path, monkeypatch):
    final, staged = tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    for d, tag in ((final, "old"), (staged, "new")):
        d.mkdir()
        (d / "latest").write_text(tag)
    commit(staged, final)
    assert (final / "latest").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    staged.mkdir()
    (staged / "latest").write_text("newer")
    real_replace, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("killed between the renames (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_rename)
    with pytest.raises(OSError):
        commit(staged, final)
    monkeypatch.undo()
    assert not final.exists() and [p.name for p in resume.variants(final)] == ["last.ckpt.partial", "last.ckpt.old"]
    resume.tidy([tmp_path])  # at the next start: the complete staged copy finishes the swap
    assert (final / "latest").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def fit_with_periodic_checkpoints(root: Path, steps: int = 2, every: int = 1, **trainer_kw) -> L.Trainer:
    from tests.tiny_fit import loader, make_batches, make_module

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, default_root_dir=root, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[PeriodicCheckpoint(str(root / "checkpoints"), every_n_train_steps=every)],
                        plugins=[AtomicCheckpointIO()], **trainer_kw)
    trainer.fit(make_module(), loader(make_batches(steps)))
    return trainer


def test_a_file_checkpoint_is_written_with_one_rename(tmp_path, monkeypatch):
    """A kill between two renames used to leave a complete last.ckpt.partial that resuming ignored."""
    real_replace, renames = os.replace, []

    def recording_replace(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    fit_with_periodic_checkpoints(tmp_path, steps=1)
    assert len(renames) == 1 and renames[0][0].endswith(".partial") and renames[0][1] == "last.ckpt"
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_training_start_removes_what_interrupted_saves_left(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    debris = [ckpts / ".last.ckpt.4242.abcd1234.partial", tmp_path / ".hpc_ckpt_1.ckpt.4242.abcd1234.partial",
              ckpts / "last.ckpt.partial", tmp_path / ".export.abcd1234.partial"]
    for p in debris[:2]:
        p.write_bytes(b"half a checkpoint")
    for p in debris[2:]:  # an incomplete DeepSpeed directory and a half-written export
        (p / "checkpoint").mkdir(parents=True)
    fit_with_periodic_checkpoints(tmp_path, steps=1, every=0)
    assert not any(p.exists() for p in debris)


# --- which checkpoint ------------------------------------------------------------------------------------
def save_ckpt(path: Path, step: int, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_ckpt_path_values(tmp_path):
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        callbacks=[PeriodicCheckpoint(str(tmp_path / "checkpoints"), every_n_train_steps=5)])
    assert resolve_ckpt_path(None, trainer) is None
    assert resolve_ckpt_path("auto", trainer) is None  # nothing yet: start fresh
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last but there is no checkpoint at .*last\.ckpt"):
        resolve_ckpt_path("last", trainer)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nope\.ckpt; ckpt_path takes"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), trainer)
    last = save_ckpt(tmp_path / "checkpoints" / "last.ckpt", 5, mtime=1)
    hpc = save_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 7)  # the Slurm requeue checkpoint is newer
    assert resolve_ckpt_path("auto", trainer) == resolve_ckpt_path("last", trainer) == str(hpc)
    os.utime(hpc, (0, 0))
    assert resolve_ckpt_path("auto", trainer) == str(last)


def test_a_complete_staged_checkpoint_is_resumed_from(tmp_path):
    """What a kill between the two renames of the earlier save left: the run restarted from step 0."""
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        callbacks=[PeriodicCheckpoint(str(tmp_path / "checkpoints"), every_n_train_steps=5)])
    staged = save_ckpt(tmp_path / "checkpoints" / "last.ckpt.partial", 5)
    assert resolve_ckpt_path("auto", trainer) == str(staged)


def test_a_truncated_checkpoint_is_skipped_for_the_previous_good_one(tmp_path, caplog):
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        callbacks=[PeriodicCheckpoint(str(tmp_path / "checkpoints"), every_n_train_steps=5)])
    best = save_ckpt(tmp_path / "checkpoints" / "step000005.ckpt", 5, mtime=1)
    last = save_ckpt(tmp_path / "checkpoints" / "last.ckpt", 10)
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # killed while copying, disk full, ...
    with caplog.at_level("WARNING"):
        assert resolve_ckpt_path("auto", trainer) == str(best)
    assert f"skipped {last}: unreadable, truncated or corrupt" in caplog.text and f"resuming from {best} instead" in caplog.text
    with pytest.raises(ConfigError, match=rf"ckpt_path={last} is unreadable, truncated or corrupt"):
        resolve_ckpt_path(str(last), trainer)
    best.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"ckpt_path=auto: no usable checkpoint to resume from .*last\.ckpt.*step000005\.ckpt"):
        resolve_ckpt_path("auto", trainer)
