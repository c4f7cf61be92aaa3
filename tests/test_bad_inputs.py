"""Bad input ends in one paragraph that names the problem and the fix, and exit code 2 (train/errors.py).

One row per case: what the user typed (after `python -m train`), and words the message must contain.
To add a case, add a row; `{export}` etc. are the files the `inputs` fixture makes. Every case runs as
a real subprocess and fails before any data work or training (the tiny overrides keep it short if not).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.config import ConfigError
from tests.helpers import tiny_model
from train.errors import EXIT_BAD_INPUT, exit_on_input_error

ROOT = Path(__file__).resolve().parents[1]
TINY = ["trainer.accelerator=cpu", "trainer.max_steps=1", "trainer.val_check_interval=1", "data.num_workers=0", "export=false"]

CASES = [  # (id, arguments after `python -m train`, words the message contains)
    ("lr-not-a-number", ["optim.lr=abc"], ["optim.lr must be a number", "'abc'"]),
    ("batch-size-zero", ["data.batch_size=0"], ["data.batch_size must be > 0"]),
    ("decay-steps-zero", ["optim.decay_steps=0"], ["optim.decay_steps must be >= 1"]),
    ("workers-not-a-count", ["data.num_workers=many"], ["data.num_workers must be a count", "'auto'", "'many'"]),
    ("unknown-key", ["model.config.text.hiden_size=3"], ["hiden_size", "not in struct"]),
    ("unknown-key-added", ["+model.config.text.hiden_size=3"], ["unknown key(s) in model.text", "did you mean 'hidden_size'"]),
    ("unknown-arch", ["arch=nope"], ["Could not find 'arch/nope'"]),
    ("plan-file-bad-yaml", ["arch=file", "arch.path={bad_plan}"], ["{bad_plan} is not valid YAML at line 3, column 1"]),
    ("plan-file-missing", ["arch=file", "arch.path={tmp}/nope.yaml"], ["no such plan file"]),
    ("pdrop-renumbers-m-rope", ["model=tiny_qwen2vl", "data=synthetic_hires", "arch=pdrop", "arch.methods.pdrop.positions=renumber"],
     ["plan 'pdrop' renumbers RoPE positions", "no meaning for the qwen2_vl family's positions"]),
    ("pretrained-missing", ["model.pretrained={tmp}/nope"], ["is not a checkpoint directory", "model.pretrained"]),
    ("pretrained-weights-do-not-fit", ["model.pretrained={bad_export}"], ["do not fit", "wrong shape", "mlp.gate_proj.weight"]),
    ("checkpoint-missing", ["ckpt_path={tmp}/nope.ckpt"], ["no checkpoint at {tmp}/nope.ckpt", "ckpt_path takes"]),
    ("checkpoint-required", ["ckpt_path=last"], ["ckpt_path=last but there is no checkpoint"]),
    ("checkpoint-truncated", ["ckpt_path={truncated}"], ["ckpt_path={truncated} is unreadable, truncated or corrupt"]),
    ("shards-missing", ["data=shards", "data.source.train={tmp}/none.tar", "data.source.val={tmp}/none.tar"],
     ["shard(s) not found", "data.source.train/val"]),
    ("extend-to-not-a-number", ["resume.extend_to=abc"], ["resume.extend_to must be an integer"]),
    ("callback-setting", ["callbacks.preemption.when=sometimes"], ["callbacks.preemption.when must be one of"]),
    ("evaluate-needs-weights", ["evaluate"], ["set model.pretrained"]),
    ("evaluate-plan-needs-training", ["evaluate", "model.pretrained={export}", "arch=xattn"], ["needs training"]),
    ("evaluate-routers-need-training", ["evaluate", "model.pretrained={export}", "arch=pmod"], ["adds routers", "needs training"]),
    ("route-on-frozen-layers", ["arch=pmod+vica"], ["route picks the visual tokens a layer updates", "keep one of the two"]),
    ("evaluate-extend", ["evaluate", "model.pretrained={export}", "resume.extend_to=5"], ["does not train"]),
    ("tool-unknown-arch", ["flops", "arch=nope"], ["Could not find 'arch/nope'"]),
    ("recipe-needs-weights", ["experiment=llava15_7b_finetune", "data.source.train=x.tar", "data.source.val=x.tar"],
     ["model.pretrained is required here: a llava directory (the stage-1 export", "set model.pretrained=... on the command line"]),
    ("recipe-batch-does-not-divide", ["experiment=llava15_7b_finetune", "trainer.devices=3", "model.pretrained={export}",
                                      "data.source.train=x.tar", "data.source.val=x.tar"],
     ["global_batch_size=128 is not a multiple of", "16 x 3 x 1 = 48", "change data.batch_size"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    export = tiny_model().save_pretrained(tmp / "export")
    bad_export = tmp / "bad_export"  # its config.json says a wider FFN than its weights
    shutil.copytree(export, bad_export)
    config = json.loads((bad_export / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (bad_export / "config.json").write_text(json.dumps(config))
    bad_plan = tmp / "plan.yaml"
    bad_plan.write_text("methods:\n  vica: {t2v_layers: [0\n")
    truncated = tmp / "truncated.ckpt"
    torch.save({"global_step": 1, "state_dict": {"w": torch.zeros(4096)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    return {"tmp": str(tmp), "export": str(export), "bad_export": str(bad_export), "bad_plan": str(bad_plan),
            "truncated": str(truncated)}


def run_train(args: list[str], tmp: str, case: str, **env) -> subprocess.CompletedProcess:
    job = args[0] if args and "=" not in args[0] else "train"  # `evaluate`, a tool, or the training job
    overrides = {"train": [f"paths.root_dir={tmp}", f"hydra.run.dir={tmp}/runs/{case}", *TINY],
                 "evaluate": [f"paths.root_dir={tmp}", f"hydra.run.dir={tmp}/runs/{case}"]}.get(job, [])
    words = [job] if job != "train" else []
    cmd = [sys.executable, "-m", "train", *words, *overrides, *args[len(words):]]  # the case's overrides win
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
@pytest.mark.parametrize("case,args,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_paragraph(inputs, case, args, words):
    proc = run_train([a.format(**inputs) for a in args], inputs["tmp"], case)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word.format(**inputs) in proc.stderr, proc.stderr[-3000:]
    assert not Path(inputs["tmp"], "runs", case, "metrics.json").exists()


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(inputs):
    proc = run_train(["optim.lr=abc"], inputs["tmp"], "full-error", HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "optim.lr must be a number" in proc.stderr


def test_input_errors_become_exit_2_and_other_errors_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        with exit_on_input_error():
            try:
                raise ConfigError("optim.lr must be a number, got 'abc' (str)")
            except ConfigError as e:
                raise RuntimeError("Error in call to target 'train.optim.OptimConfig'") from e  # as Hydra wraps it
    assert exit_.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error: optim.lr must be a number, got 'abc' (str)\n")
    with pytest.raises(ZeroDivisionError), exit_on_input_error():
        1 / 0
    with pytest.raises(ConfigError), exit_on_input_error(enabled=False):  # in a sweep: raised for the launcher
        raise ConfigError("x")
