"""`python -m train time_to_accuracy`: which evaluation first reaches the target, the best accuracy within a
budget, and one row set per run even when two runs share a name (two families of one model and plan)."""

import csv
import json

import yaml

from train.tools import time_to_accuracy


def fake_run(path, run_name, evals):
    """A run directory as a training run leaves it: config.yaml and csv/metrics.csv (training rows between)."""
    (path / "csv").mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"run_name": run_name}))
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "train/loss", "perf/train_seconds", "val/acc", "val/acc/fine"])
        w.writeheader()
        for step, seconds, acc in evals:
            w.writerow({"step": step - 1, "train/loss": 1.0})
            w.writerow({"step": step, "perf/train_seconds": seconds, "val/acc": acc, "val/acc/fine": acc / 2})
    return path


def test_runs_sharing_a_name_keep_their_own_rows_and_targets(tmp_path, capsys):
    a = fake_run(tmp_path / "next-dense", "tiny-dense", [(100, 50.0, 0.4), (200, 100.0, 0.6)])
    b = fake_run(tmp_path / "llava-dense", "tiny-dense", [(100, 20.0, 0.3), (200, 40.0, 0.45)])
    c = fake_run(tmp_path / "next-vica", "tiny-vica", [(100, 25.0, 0.5), (200, 50.0, 0.62)])
    summary = time_to_accuracy.main([str(a), str(b), str(c), "--budget", "60", "--out", str(tmp_path / "out")])
    runs = summary["runs"]
    assert list(runs) == ["tiny-dense", str(b), "tiny-vica"]
    assert summary["target"] == 0.6  # the first run's final accuracy
    assert runs["tiny-dense"]["reaches_target_at_seconds"] == 100.0
    assert runs[str(b)]["reaches_target_at_seconds"] is None and runs[str(b)]["best_acc"] == 0.45
    assert runs["tiny-vica"]["reaches_target_at_step"] == 200 and runs["tiny-vica"]["reaches_target_at_seconds"] == 50.0
    assert runs["tiny-dense"]["within_budget"] == {"best_acc": 0.4, "step": 100, "train_seconds": 50.0}
    rows = list(csv.DictReader(open(tmp_path / "out" / "time_to_accuracy.csv")))
    assert len(rows) == 6 and {r["run"] for r in rows} == set(runs)
    assert json.loads(capsys.readouterr().out)["target"] == 0.6
