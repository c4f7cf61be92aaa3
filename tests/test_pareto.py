"""Pareto sweeps: the pinned sweep composes valid plans, the launcher configs render, the aggregator
tabulates and plots a sweep and reports failed or missing runs, and a real sweep runs end to end."""

import csv
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from train.tools import pareto

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
POINTS = sorted(p.stem for p in (ROOT / "conf" / "pareto").glob("*.yaml"))
PNG = b"\x89PNG\r\n\x1a\n"


def compose_train(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


# ---------------------------------------------------------------- frontier


def test_pareto_front_hand_checked():
    points = [
        (1.0, 0.60),  # 0 dense: the most accurate
        (0.5, 0.55),  # 1 on the front
        (0.5, 0.50),  # 2 same cost as 1, less accurate
        (0.3, 0.40),  # 3 the cheapest
        (0.8, 0.58),  # 4 on the front
        (0.9, 0.57),  # 5 beaten by 4 (cheaper and more accurate)
        (0.2, math.nan),  # 6 no accuracy: ignored
        (1.2, 0.60),  # 7 as accurate as 0 at more cost
        (0.3, 0.40),  # 8 duplicate of 3: the first is kept
    ]
    assert pareto.pareto_front(points) == [3, 1, 4, 0]
    assert pareto.pareto_front([]) == []
    assert pareto.pareto_front([(2.0, 0.1)]) == [0]


# ---------------------------------------------------------------- configs


def test_pareto_sweeps_every_point_on_the_base_and_names_runs_by_point():
    cfg = compose_train(["experiment=pareto", "pareto=fastv_k33"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.pareto == "glob(*)"
    assert cfg.hydra.sweep.dir.startswith(f"{cfg.paths.log_dir}/multiruns/pareto/")
    HydraConfig.instance().set_config(cfg)
    assert cfg.run_name == "tiny-fastv_k33"
    assert cfg.model.pretrained == f"{cfg.paths.log_dir}/base/tiny-dense/export"  # experiment=base writes it
    assert OmegaConf.to_container(cfg.arch, resolve=True) == {"methods": {"fastv": {"K": 1, "R": 0.6666666667, "reference_depth": 4,
                                                                               "per": "image"}}}
    assert cfg.trainer.max_steps == 0  # training-free: evaluated as is
    assert len(POINTS) >= 25 and "dense" in POINTS
    for k in ("33", "22", "11"):  # the field's baselines at the field's ratios
        assert {f"random_k{k}", f"uniform_k{k}", f"dominant_k{k}", f"fastv_k{k}"} <= set(POINTS)


@pytest.mark.parametrize("point", POINTS)
def test_every_sweep_point_is_a_valid_plan_of_the_tiny_model(point):
    from models.methods import resolve_arch

    cfg = compose_train(["experiment=pareto", f"pareto={point}"])
    text = cfg.model.config.text
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    plan = resolve_arch(arch, text.num_hidden_layers, text.num_attention_heads)
    method = plan.name.split("[")[0]  # pdrop[positions=keep]: PDrop keeping the survivors' positions
    assert f"{point.removeprefix('ft_')}_".startswith(f"{method}_")  # the file name starts with the method
    for knobs in arch["methods"].values():
        assert knobs.get("reference_depth", text.num_hidden_layers) == text.num_hidden_layers  # layers are the tiny model's
    if point.startswith("ft_"):  # fine-tuned from the base: LLaVA's stage 2 for the sweep's steps
        assert cfg.stage.name == "finetune" and cfg.trainer.max_steps == cfg.pareto_finetune.steps > 0
    else:
        assert cfg.trainer.max_steps == 0


def test_submitit_local_launcher_config():
    cfg = compose_train(["experiment=pareto", "hydra/launcher=submitit_local"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1


def test_submitit_slurm_launcher_renders_an_sbatch_script(tmp_path, monkeypatch):
    """The launcher's keys, converted the way hydra-submitit-launcher does, give the sbatch header
    Lightning needs (tasks per node = trainer.devices). A stand-in `srun` lets submitit build a
    Slurm executor without a cluster; nothing is submitted."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setenv("EMLLM_SLURM_PARTITION", "gpu")
    cfg = compose_train(["experiment=pareto", "hydra/launcher=submitit_slurm", "trainer.devices=4",
                         "trainer.num_nodes=2", "hydra.launcher.gpus_per_node=${trainer.devices}"])
    HydraConfig.instance().set_config(cfg)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    assert params["submitit_folder"].endswith("/.submitit/%j")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit", slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in ["#SBATCH --ntasks-per-node=4", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --time=240",
                 "export OMP_NUM_THREADS=8"]:
        assert line in script, (line, script)
    assert "--account" not in script  # null: the cluster's default


# ---------------------------------------------------------------- aggregator on a fake sweep

FAKE = {  # point: (method, knobs, val/acc, val/acc/fine, eff/flops_ratio, eff/prefill_ms)
    "dense": ("dense", {}, 0.60, 0.30, 1.00, 10.0),
    "fastv_r50": ("fastv", {"fastv": {"K": 1, "R": 0.5, "reference_depth": 4}}, 0.58, 0.20, 0.62, 7.0),
    "fastv_r75": ("fastv", {"fastv": {"K": 1, "R": 0.75, "reference_depth": 4}}, 0.50, 0.10, 0.45, 5.5),
    "vica_t2v1": ("vica", {"vica": {"t2v_layers": [1], "reference_depth": 4}}, 0.52, 0.25, 0.30, 6.0),
}


def fake_run(sweep: Path, num: int, point: str, job_id: str, finished: bool = True) -> Path:
    method, knobs, acc, fine, ratio, ms = FAKE.get(point, ("vtw", {"vtw": {"K": 1}}, 0, 0, 0, 0))
    d = sweep / f"{num}_{point}"
    (d / ".hydra").mkdir(parents=True)
    hydra_cfg = {"hydra": {"job": {"id": job_id, "num": num}, "runtime": {"choices": {"pareto": point}}}}
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))
    (d / "config.yaml").write_text(yaml.safe_dump({"run_name": f"tiny-{point}", "arch": {"methods": knobs}}))
    if finished:
        metrics = {"val/acc": acc, "val/acc/fine": fine, "val/acc/count": acc, "val/acc_majority": 0.38,
                   "val/acc_noimage": 0.36, "val/loss": 0.5, "eff/flops_ratio": ratio, "eff/prefill_ms": ms,
                   "eff/decode_ms_per_token": 2.0, "eff/kv_cache_mb": ratio, "eff/prefill_tflops": ratio * 1e-4,
                   "eff/tower_tflops": 3e-5, "eff/projector_tflops": 2e-6}
        summary = {"run_dir": str(d), "model": "tiny", "arch": method, "steps": 1200, "seconds": {"total": 600.0},
                   "flops": {"convention": "2mac", "scope": "total", "per": "sample, prefill, decoder layers"},
                   "metrics": metrics}
        (d / "metrics.json").write_text(json.dumps(summary))
    return d


class Planted:
    """Unpickling this creates `path`: a stand-in for code someone planted in a sweep directory."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def planted_pickle(sweep: Path) -> bytes:
    return pickle.dumps(("error", Planted(sweep / "PLANTED_CODE_RAN")))


@pytest.fixture
def fake_sweep(tmp_path):
    sweep = tmp_path / "multiruns" / "pareto" / "2026-01-01_00-00-00"
    for num, point in enumerate(FAKE):
        fake_run(sweep, num, point, job_id=f"10{num}")
    # killed by the time limit: no metrics.json, no submitit result, an .err log
    fake_run(sweep, 4, "vtw_k1", job_id="104", finished=False)
    jobs = sweep / ".submitit"
    (jobs / "104").mkdir(parents=True)
    (jobs / "104" / "104_0_log.err").write_text(
        "Seed set to 0\rEpoch 0:  10%|#  | 120/1200\rEpoch 0:  50%|#####  | 600/1200\n"
        "slurmstepd: error: *** STEP 104.0 CANCELLED AT 2026-01-01T01:00:00 DUE TO TIME LIMIT ***\n")
    # raised inside the run: Hydra caught it (submitit's result pickle holds it), train/__main__.py wrote error.txt
    run = fake_run(sweep, 5, "shortv_n2", job_id="105", finished=False)
    (run / "error.txt").write_text('Traceback (most recent call last):\n  File "train/run.py", line 120, in run\n'
                                   "    plan = spec.plan(arch)\nValueError: arch.methods.shortv: shortv.N=99 must be in 1..19\n")
    (jobs / "105").mkdir()
    (jobs / "105" / "105_0_result.pkl").write_bytes(planted_pickle(sweep))
    (jobs / "105" / "105_0_log.err").write_text("Seed set to 0\n")
    # lost: a submitted job that crashed before Hydra made its run directory
    (jobs / "106").mkdir()
    (jobs / "106" / "106_submitted.pkl").write_bytes(planted_pickle(sweep))
    (jobs / "106" / "106_0_log.err").write_text(
        "submitit ERROR (2026-01-01 00:00:01,000) - Submitted job triggered an exception\nTraceback (most recent call last):\n"
        '  File "<frozen runpy>", line 198, in _run_module_as_main\nModuleNotFoundError: No module named \'train\'\n')
    (jobs / "106" / "106_0_result.pkl").write_bytes(planted_pickle(sweep))
    (sweep / "7_empty").mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_aggregator_tables_plots_and_reports_failures(fake_sweep, capsys):
    assert pareto.main([str(fake_sweep)]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)  # stdout is the JSON summary only

    assert summary["n_runs"] == 4 and summary["n_failed"] == 4
    reasons = {Path(f["run_dir"]).name: f["reason"] for f in summary["failed"]}
    assert "killed" in reasons["4_vtw_k1"]
    assert "ValueError: arch.methods.shortv: shortv.N=99" in reasons["5_shortv_n2"]
    assert "106" in reasons["106"] and "ModuleNotFoundError" in reasons["106"]
    assert "empty directory" in reasons["7_empty"]
    assert "TIME LIMIT" in err and "4_vtw_k1" in err  # the .err tail, progress-bar redraws collapsed
    assert "10%" not in err

    # frontier: cheapest first; fastv_r75 is beaten on FLOPs by vica_t2v1 but is the fastest
    assert [p["point"] for p in summary["frontier"]["flops"]] == ["vica_t2v1", "fastv_r50", "dense"]
    assert [p["point"] for p in summary["frontier"]["latency"]] == ["fastv_r75", "vica_t2v1", "fastv_r50", "dense"]

    rows = list(csv.DictReader(open(summary["csv"])))
    assert [r["point"] for r in rows] == ["vica_t2v1", "fastv_r75", "fastv_r50", "dense"]  # by FLOPs ratio
    assert rows[1]["method"] == "fastv" and rows[1]["knobs"] == "K=1 R=0.75 reference_depth=4"
    assert rows[1]["varied"] == "R=0.75" and rows[0]["varied"] == ""
    assert float(rows[3]["val/acc/fine"]) == 0.30 and rows[3]["frontier_flops"] == "True"
    assert float(rows[0]["eff/tower_tflops"]) == 3e-5 and float(rows[0]["eff/projector_tflops"]) == 2e-6

    md = Path(summary["markdown"]).read_text()
    assert "2 x multiply-accumulates" in md and "scope=total" in md
    assert "## Runs without results" in md and "TIME LIMIT" in md and "shortv.N=99" in md
    assert md.count("| fastv |") == 2
    for path in summary["plots"].values():
        assert Path(path).read_bytes()[:8] == PNG and Path(path).stat().st_size > 20_000
    assert summary["wandb"] is None


def test_planted_pickles_are_never_loaded(fake_sweep, capsys):
    pickle.loads(planted_pickle(fake_sweep.parent))  # what loading one does
    assert (fake_sweep.parent / "PLANTED_CODE_RAN").exists()
    assert pareto.main([str(fake_sweep)]) == 0
    assert json.loads(capsys.readouterr().out)["n_failed"] == 4
    assert not (fake_sweep / "PLANTED_CODE_RAN").exists()


def test_aggregator_without_finished_runs_says_so(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep, 0, "dense", job_id="0", finished=False)
    assert pareto.main([str(sweep), "--out", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "no finished runs" in err and "0_dense" in err
    assert json.loads(out)["n_failed"] == 1
    assert pareto.main([str(tmp_path / "missing")]) == 2


def test_aggregator_logs_a_wandb_summary_run_offline(fake_sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out_dir = tmp_path / "out"
    assert pareto.main([str(fake_sweep), "--out", str(out_dir), "--wandb"]) == 0
    summary = json.loads(capsys.readouterr().out)
    run_dir = Path(summary["wandb"])
    assert run_dir.parent == out_dir / "wandb" and run_dir.name.startswith("offline-run-")
    assert list(run_dir.glob("run-*.wandb"))
    media = run_dir / "files" / "media"
    assert list((media / "table").rglob("*.table.json")) and len(list((media / "images").rglob("*.png"))) == 2


# ---------------------------------------------------------------- end to end


SMALL_TASK = ["data.source.n_train=48", "data.source.n_val=24", "data.num_workers=0", "data.batch_size=4",
              "eval.max_new_tokens=2", "eval.noimage=false"]


@pytest.mark.slow
def test_sweep_end_to_end_with_submitit_local(tmp_path):
    """A cut-down base, then a training-free point, a fine-tuned point and a broken one (from an extra
    config dir) evaluated or fine-tuned from it through submitit_local, then the aggregator: the good
    points are drawn with their protocol, the broken one reported. One job at a time
    (max_batch_size=1, the broken point last, as a failed batch ends the sweep)."""
    base = subprocess.run(
        [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", "arch=dense", f"hydra.run.dir={tmp_path / 'base'}",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "model.config.text.num_hidden_layers=2",
         "model.config.vision.num_hidden_layers=2", *SMALL_TASK],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert base.returncode == 0, base.stderr[-3000:]
    extra = tmp_path / "extra" / "pareto"
    extra.mkdir(parents=True)
    (extra / "broken.yaml").write_text("# @package _global_\ndefaults:\n  - override /arch: shortv\n"
                                       "arch:\n  methods:\n    shortv:\n      N: 99\n")
    cmd = [
        sys.executable, "-m", "train", "-m", "experiment=pareto", "hydra/launcher=submitit_local",
        "pareto=dense,fastv_k33,ft_vica,broken", f"hydra.searchpath=[file://{tmp_path / 'extra'}]",
        "hydra.sweeper.max_batch_size=1", "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1",
        f"paths.root_dir={tmp_path}", f"model.pretrained={tmp_path / 'base' / 'export'}", "pareto_finetune.steps=2",
        *SMALL_TASK,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0 and "shortv.N=99" in proc.stderr  # Hydra reports the broken point at the end
    (sweep,) = (tmp_path / "outputs" / "multiruns" / "pareto").iterdir()
    for run, steps in [("0_dense", 0), ("1_fastv_k33", 0), ("2_ft_vica", 2)]:
        summary = json.loads((sweep / run / "metrics.json").read_text())
        assert summary["steps"] == steps and "eff/flops_ratio" in summary["metrics"], proc.stderr[-3000:]
    assert list((sweep / ".submitit").glob("*/*_0_log.err"))

    agg = subprocess.run([sys.executable, "-m", "train", "pareto", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert agg.returncode == 0, agg.stderr
    result = json.loads(agg.stdout)
    assert result["n_runs"] == 3 and result["n_failed"] == 1
    assert "ConfigError" in result["failed"][0]["reason"] and "3_broken" in agg.stderr
    rows = {r["point"]: r for r in csv.DictReader(open(result["csv"]))}
    assert rows["dense"]["method"] == "dense" and float(rows["dense"]["eff/flops_ratio"]) == 1.0
    assert float(rows["dense"]["eff/tower_tflops"]) > float(rows["dense"]["eff/projector_tflops"]) > 0  # Family.vision_flops
    assert rows["fastv_k33"]["method"] == "fastv" and float(rows["fastv_k33"]["eff/flops_ratio"]) < 1.0
    assert rows["fastv_k33"]["protocol"] == "training-free" and rows["ft_vica"]["protocol"] == "fine-tuned 2 steps"
    for path in result["plots"].values():
        assert Path(path).read_bytes()[:8] == PNG
