"""Continuing a run directory continues the same experiment, and a finished run stays finished.

Every checkpoint carries the resolved run config and the seconds of every attempt so far (`RunRecord`;
plain values, since checkpoints load with weights_only=True). On resume the current config is compared
with the checkpoint's, key by key:

* keys that define the experiment (EXPERIMENT: the model, plan, data, optimizer, stage, adapters, seed,
  step budget, accumulation, clipping, precision, strategy) must be equal: a ViCA checkpoint resumed
  with `arch=dense` or another batch size would silently turn into a different run. The job refuses,
  listing every difference (checkpoint -> now); `resume.allow_changes=true` continues anyway with a
  warning that lists them. `resume.extend_to=<steps>` is the way to give a run more steps.
* everything else passes with a note: logging, callbacks, paths, evaluation settings, loader workers
  (HOW_IT_RUNS), and the number of devices where the strategy re-shards a checkpoint (DDP keeps full
  copies, FSDP2's distributed checkpoints re-shard on load; DeepSpeed's ZeRO partitions do not). A
  different device count changes the global batch (data.batch_size is per device); the data stream and
  RNG states then restart from the seed (their warnings say so).

A run directory whose `metrics.json` says it reached `trainer.max_steps` under the same experiment is
finished: the job prints where its results are and leaves them alone (exit 0).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from models.config import ConfigError, check_types

log = logging.getLogger(__name__)

EXPERIMENT = (
    "model", "arch", "data", "optim", "stage", "peft", "seed", "nonfinite", "strategy.name", "strategy.stage",
    "trainer.max_steps", "trainer.accumulate_grad_batches", "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm", "trainer.precision",
)
HOW_IT_RUNS = ("data.num_workers", "data.eval_batch_size", "model.gradient_checkpointing",
               "data.source.root")  # the synthetic cache's location; its content is keyed on the other data.source.* keys
DEVICES = ("trainer.devices", "trainer.num_nodes")
NOT_COMPARED = ("ckpt_path", "resume")
ABSENT = object()  # a key one of the two configs does not have


@dataclass
class ResumeOptions:
    """The `resume` config node: what a run directory that is used again may do."""

    allow_changes: bool = False  # resume even though the experiment's settings changed (listed as a warning)
    extend_to: int | None = None  # continue the run (a finished one too) to this many steps: trainer.max_steps

    def __post_init__(self) -> None:
        check_types(self, "resume")
        if self.extend_to is not None and self.extend_to < 1:
            raise ConfigError(f"resume.extend_to is the step count to continue the run to (>= 1), got {self.extend_to}")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} for nested dicts; lists are leaves."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def reshards(config: dict) -> bool:
    """Whether the configured strategy loads a checkpoint on another number of devices."""
    return not str((config.get("strategy") or {}).get("name", "")).startswith("deepspeed")


def show(value: Any) -> str:
    text = "(absent)" if value is ABSENT else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class ConfigChanges:
    experiment: list[str] = field(default_factory=list)  # "key: old -> new", refused unless allowed
    other: list[str] = field(default_factory=list)  # noted


def config_changes(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> ConfigChanges:
    """Every key whose value differs between two resolved run configs, split by what it changes."""
    old, new = flatten(saved), flatten(current)
    changes = ConfigChanges()
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, ABSENT), new.get(key, ABSENT)
        if before == after or under(key, NOT_COMPARED + ignore):
            continue
        line = f"{key}: {show(before)} -> {show(after)}"
        if under(key, HOW_IT_RUNS):
            changes.other.append(line)
        elif under(key, DEVICES):
            (changes.other if reshards(current) else changes.experiment).append(line)
        elif under(key, EXPERIMENT):
            changes.experiment.append(line)
        else:
            changes.other.append(line)
    return changes


def check_resume(saved: dict | None, current: dict, source: str, allow_changes: bool = False,
                 ignore: tuple[str, ...] = ()) -> None:
    """Refuse (ConfigError) to resume `source` under a config whose experiment differs from `saved`."""
    if saved is None:
        log.warning("%s records no run config (written before checkpoints carried one): not compared", source)
        return
    changes = config_changes(saved, current, ignore)
    if changes.other:
        log.info("resuming %s with settings that do not change the experiment: %s", source, "; ".join(changes.other))
    if not changes.experiment:
        return
    listed = "; ".join(changes.experiment)
    if allow_changes:
        log.warning("resume.allow_changes=true: continuing %s as a different experiment (checkpoint -> now): %s", source, listed)
        return
    raise ConfigError(
        f"{source} belongs to a different experiment than this config, and resuming it would silently continue "
        f"another run. Differences (checkpoint -> now): {listed}. Use the checkpoint's settings, start a new run "
        "(another hydra.run.dir, or ckpt_path=null), give it more steps with resume.extend_to=<steps>, or set "
        "resume.allow_changes=true to continue with these changes"
    )


class RunRecord(L.Callback):
    """The run config and every attempt's seconds in each checkpoint; on resume, the config check.

    `config`: the resolved run config (plain values). `started`: when this attempt began (time.time()).
    A file checkpoint is checked before any data work (train/run.py calls `resumed`); a directory
    (DeepSpeed, FSDP2) when Lightning loads it (`on_load_checkpoint`).
    """

    CONFIG_KEY = "run_config"
    SECONDS_KEY = "attempt_seconds"

    def __init__(self, config: dict, started: float, allow_changes: bool = False, ignore: tuple[str, ...] = ()):
        self.config, self.started = config, started
        self.allow_changes, self.ignore = allow_changes, ignore
        self.earlier: list[float] = []  # seconds of the attempts before this one, as of the resumed checkpoint
        self.checked = False

    def seconds(self) -> float:
        return time.time() - self.started

    def resumed(self, checkpoint: dict, source: str) -> None:
        self.earlier = [float(s) for s in checkpoint.get(self.SECONDS_KEY, [])]
        if not self.checked:
            check_resume(checkpoint.get(self.CONFIG_KEY), self.config, source, self.allow_changes, self.ignore)
            self.checked = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.CONFIG_KEY] = self.config
        checkpoint[self.SECONDS_KEY] = [*self.earlier, round(self.seconds(), 1)]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":  # not the best checkpoint that the final evaluation loads
            self.resumed(checkpoint, "the checkpoint being resumed")


def finished_summary(run_dir: str | Path, current: dict, max_steps: int) -> dict | None:
    """The report of a run in `run_dir` that already reached `max_steps` under the same experiment
    (its metrics.json and config.yaml), else None."""
    metrics, config = Path(run_dir) / "metrics.json", Path(run_dir) / "config.yaml"
    if not (metrics.is_file() and config.is_file()):
        return None
    summary = json.loads(metrics.read_text())
    if summary.get("steps", 0) < max_steps or max_steps <= 0:
        return None
    saved = yaml.safe_load(config.read_text())
    if config_changes(saved, current, ignore=("trainer.max_steps",)).experiment:
        return None  # another experiment in the same directory: resuming decides (and refuses)
    return summary
