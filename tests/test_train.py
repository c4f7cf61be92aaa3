"""Training really learns, and the main job writes metrics, config, checkpoints and an export."""

import json
import subprocess
from dataclasses import asdict
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from data.chat import ChatTokenizer
from models.families.llava import PadToSquare
from data.datamodule import ImageSpec, MLLMDataModule, SampleEncoder
from models import MLLM, MLLMConfig
from models.plan import Plan
from train.evaluation import EvalConfig
from train.model_source import ModelSource
from train.module import MLLMModule
from train.optim import OptimConfig
from train.stage import StageConfig

ROOT = Path(__file__).resolve().parents[1]


def small_task_model_config():
    return MLLMConfig(
        vision=dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=2, image_size=64, patch_size=8),
        text=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_feature_select_strategy="full",
        image_token_id=3,
        image_mean=(0.5,) * 3,
        image_std=(0.5,) * 3,
    )


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def small_task_data(root, tokenizer, config, **loader) -> MLLMDataModule:
    """The synthetic shards of `root` encoded for `config` (vicuna template, no system prompt)."""
    chat = ChatTokenizer(tokenizer, "vicuna", config.num_image_tokens, 512, system="")
    return MLLMDataModule(
        sorted(str(p) for p in root.glob("train-*.tar")),
        sorted(str(p) for p in root.glob("val-*.tar")),
        SampleEncoder(chat, ImageSpec(PadToSquare(64, (0.5,) * 3, (0.5,) * 3))),
        pad_id=0, num_workers=0, **loader,
    )


def test_short_training_run_decreases_loss(synthetic_dir, task_tokenizer):
    root, _ = synthetic_dir
    config = small_task_model_config()
    dm = small_task_data(root, task_tokenizer, config, batch_size=8, eval_batch_size=30, shuffle_buffer=50)
    torch.manual_seed(0)
    module = MLLMModule(
        ModelSource(name="small", config=asdict(config), system_prompt=""),
        Plan.dense(config.hf_text_config().num_hidden_layers),
        task_tokenizer,
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.1),
        stage=StageConfig("scratch", True, True, True),
        evaluation=EvalConfig(max_new_tokens=3),
    )
    rec = LossRecorder()
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, callbacks=[rec], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, val_check_interval=40)
    trainer.fit(module, datamodule=dm)
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    m = module.last_val_metrics
    assert {"val/acc", "val/acc_noimage", "val/acc_majority", "val/loss", "val/acc/fine"} <= set(m)


DATA = ["data.source.n_train=48", "data.source.n_val=24", "data.num_workers=0", "data.batch_size=4"]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """`python -m train` on a cut-down default (run once, read by the tests below)."""
    root = tmp_path_factory.mktemp("main_job")
    cmd = [
        sys.executable, "-m", "train",
        f"paths.root_dir={root}", "run_name=smoke",
        "trainer.max_steps=6", "trainer.val_check_interval=3", *DATA,
        "model.config.text.num_hidden_layers=2", "model.config.vision.num_hidden_layers=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((root / "outputs" / "smoke").iterdir())
    assert len(run_dirs) == 1
    return root, run_dirs[0], proc


def test_main_job_end_to_end(main_job):
    """metrics.json, resolved config, checkpoints, and an export equal to the best checkpoint."""
    _, run, proc = main_job
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 6
    for key in ["val/acc", "val/acc_exact", "val/acc_noimage", "val/acc_majority", "val/loss", "val/acc/count"]:
        assert key in summary["metrics"]
    assert "val/acc" in proc.stdout and str(run / "metrics.json") in proc.stdout
    assert "${" not in (run / "config.yaml").read_text()  # resolved
    assert (run / "checkpoints" / "last.ckpt").exists()
    ckpt = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["plan"]["name"] == summary["arch"] == "vica"  # checkpoints carry what built them
    assert ckpt["hyper_parameters"]["optim"]["lr"] > 0 and ckpt["hyper_parameters"]["model"]["name"] == "tiny"
    # the export is the best checkpoint's weights, loadable by from_pretrained
    exported = MLLM.from_pretrained(run / "export")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def evaluate(root: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    cmd = [sys.executable, "-m", "train", "evaluate", f"paths.root_dir={root}", *DATA, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    runs = sorted((root / "outputs" / "eval").glob("*/*/metrics.json"), key=lambda p: p.stat().st_mtime)
    return proc, json.loads(runs[-1].read_text()) if proc.returncode == 0 else None


def test_evaluate_reproduces_the_runs_final_metrics(main_job):
    """`python -m train evaluate` on the export, under the plan it carries: the run's val metrics exactly,
    without an optimizer or a training step; under another plan: that plan's metrics and FLOPs."""
    root, run, _ = main_job
    trained = json.loads((run / "metrics.json").read_text())
    proc, evaluated = evaluate(root, f"model.pretrained={run / 'export'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert evaluated["steps"] == 0 and evaluated["arch"] == "vica" and evaluated["checkpoint"] == str(run / "export")
    assert "export" not in evaluated and "configure_optimizers" not in proc.stderr
    val = {k: v for k, v in trained["metrics"].items() if k.startswith("val/")}
    assert val and {k: evaluated["metrics"][k] for k in val} == val
    assert evaluated["metrics"]["eff/flops_ratio"] == trained["metrics"]["eff/flops_ratio"]

    proc, dense = evaluate(root, f"model.pretrained={run / 'export'}", "arch=dense")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert dense["arch"] == "dense" and dense["metrics"]["eff/flops_ratio"] == 1.0


def test_evaluate_refuses_plans_that_need_training(main_job):
    root, run, _ = main_job
    proc, _ = evaluate(root, f"model.pretrained={run / 'export'}", "arch=xattn")
    assert proc.returncode != 0 and "needs training" in proc.stderr
    proc, _ = evaluate(root)
    assert proc.returncode != 0 and "set model.pretrained" in proc.stderr


def hires_job(tmp_path, run_name: str, *overrides: str) -> tuple[Path, dict]:
    """Two steps of `python -m train experiment=hires` under gradient accumulation (2-layer LLM, `overrides`
    for the model): its run directory and metrics.json."""
    cmd = [sys.executable, "-m", "train", "experiment=hires", f"paths.root_dir={tmp_path}", *DATA,
           "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.accumulate_grad_batches=2",
           "model.config.text.num_hidden_layers=2", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs" / "hires" / run_name
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 2 and 0 < summary["metrics"]["train/loss"] < 20 and "val/acc/fine" in summary["metrics"]
    return run, summary


def test_the_high_resolution_job_trains_llava_next_with_accumulation(tmp_path):
    """`python -m train experiment=hires` (tiny LLaVA-NeXT, rows with 336 and 464 visual tokens in one batch)
    under gradient accumulation: trains, evaluates and exports a directory transformers' LlavaNext loads."""
    from transformers import LlavaNextForConditionalGeneration

    run, summary = hires_job(tmp_path, "tiny_next-llava_next-dense", "model.config.vision.num_hidden_layers=2")
    assert summary["export_class"] == "LlavaNextForConditionalGeneration"
    hf = LlavaNextForConditionalGeneration.from_pretrained(run / "export")
    assert hf.config.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]


def test_the_high_resolution_job_trains_internvl_with_accumulation(tmp_path):
    """`python -m train experiment=hires model=tiny_internvl` (5 and 7 tiles, 80 and 112 visual tokens between
    <img> and </img>, in one batch) under gradient accumulation: trains, evaluates, records the tower's and
    projector's FLOPs and exports a directory transformers' InternVL loads, with GotOcr2's preprocessor config."""
    from transformers import InternVLForConditionalGeneration

    run, summary = hires_job(tmp_path, "tiny_internvl-internvl-dense", "model=tiny_internvl", "model.config.vision.num_hidden_layers=2")
    assert summary["export_class"] == "InternVLForConditionalGeneration"
    metrics = summary["metrics"]
    assert metrics["eff/tower_tflops"] > metrics["eff/projector_tflops"] > 0
    hf = InternVLForConditionalGeneration.from_pretrained(run / "export")
    assert hf.config.image_seq_length == 16
    preprocessor = json.loads((run / "export" / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "GotOcr2ImageProcessor" and preprocessor["max_patches"] == 6


def test_the_high_resolution_job_trains_qwen2_vl_with_accumulation(tmp_path):
    """`python -m train experiment=hires model=tiny_qwen2vl` (64 and 96 visual tokens per row in one batch,
    M-RoPE) under gradient accumulation: trains, evaluates, records the tower's and projector's FLOPs and
    exports a directory transformers' Qwen2VLForConditionalGeneration loads, with the data path's token ids
    and pixel bounds."""
    from transformers import Qwen2VLForConditionalGeneration

    from models import MLLM

    run, summary = hires_job(tmp_path, "tiny_qwen2vl-qwen2_vl-dense", "model=tiny_qwen2vl", "model.config.vision.depth=2")
    assert summary["export_class"] == "Qwen2VLForConditionalGeneration"
    metrics = summary["metrics"]
    assert metrics["eff/tower_tflops"] > metrics["eff/projector_tflops"] > 0
    hf = Qwen2VLForConditionalGeneration.from_pretrained(run / "export").eval()
    ours = MLLM.from_pretrained(run / "export").eval()
    assert hf.config.vision_start_token_id == 4 and ours.config.max_pixels == 12288  # the task tokenizer's <|vision_start|>
    preprocessor = json.loads((run / "export" / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "Qwen2VLImageProcessor" and preprocessor["size"]["longest_edge"] == 12288


def test_the_main_job_trains_mobilevlm_and_evaluates_its_original_layout_export(tmp_path):
    """`python -m train model=tiny_mobilevlm` (LDPv2: 144 visual tokens on a 12 x 12 grid) trains under the
    default plan and exports the original LLaVA layout with its tower's CLIP directory inside, which
    `python -m train evaluate` loads and runs under a grid plan (pool)."""
    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", "run_name=mvlm", "model=tiny_mobilevlm", *DATA,
           "trainer.max_steps=2", "trainer.val_check_interval=2", "model.config.text.num_hidden_layers=2",
           "model.config.vision.num_hidden_layers=2", "eval.noimage=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "mvlm").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    assert (summary["export_layout"], summary["export_class"]) == ("original", "MobileLlamaForCausalLM")
    assert "the original LLaVA layout" in proc.stdout
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model_type"] == "mobilevlm" and config["mm_vision_tower"] == str((run / "export" / "vision_tower").resolve())
    proc, pooled = evaluate(tmp_path, f"model.pretrained={run / 'export'}", "arch=pool", "eval.noimage=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pooled["arch"] == "pool" and 0 < pooled["metrics"]["eff/flops_ratio"] < 1 and "val/acc/fine" in pooled["metrics"]


def test_the_high_resolution_job_trains_qwen3_vl_moe_with_accumulation(tmp_path):
    """`python -m train experiment=hires model=tiny_qwen3vl_moe` (DeepStack, interleaved M-RoPE, a Qwen3-MoE
    LLM) under gradient accumulation: trains with the load-balancing loss logged, evaluates, records the
    tower's, projector's and DeepStack mergers' FLOPs, and exports a directory transformers'
    Qwen3VLMoeForConditionalGeneration loads, whose logits equal ours."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from models import MLLM

    run, summary = hires_job(tmp_path, "tiny_qwen3vl_moe-qwen3_vl_moe-dense", "model=tiny_qwen3vl_moe", "model.config.vision.depth=2")
    assert summary["export_class"] == "Qwen3VLMoeForConditionalGeneration"
    metrics = summary["metrics"]
    assert metrics["eff/tower_tflops"] > metrics["eff/deepstack_tflops"] > metrics["eff/projector_tflops"] > 0
    assert metrics["train/moe_aux_loss"] > 0 and metrics["eff/expert_load_max"] >= 1  # 1: every expert as busy as the others
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(run / "export").eval()
    ours = MLLM.from_pretrained(run / "export").eval()
    ids = torch.tensor([[7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_every_small_model_preset_trains_on_the_default_task(model, tmp_path):
    """`python -m train model=<preset>` (2 steps of the default task, a 2-layer LLM) for every preset small enough
    to train here, with the data.max_length its config check asks for, if any (tests/test_configs.py checks
    every preset's config, the large ones' refusal included)."""
    import re

    from models.config import ConfigError
    from tests.test_configs import SMALL, compose_train, parameter_count
    from train.builders import RunConfig, build, register_resolvers

    register_resolvers()
    cfg = compose_train([f"model={model}"])
    if parameter_count(build(cfg.model, "model").mllm_config) >= SMALL:
        pytest.skip("a shape for real weights: its config is checked in tests/test_configs.py")
    try:
        RunConfig.from_config(cfg)
        asked = []
    except ConfigError as e:
        asked = re.findall(r"data\.max_length=\d+", str(e))
    cmd = [sys.executable, "-m", "train", f"model={model}", f"paths.root_dir={tmp_path}", "run_name=smoke", *DATA, *asked,
           "trainer.max_steps=2", "trainer.val_check_interval=2", "model.config.text.num_hidden_layers=2", "export=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "smoke").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 2 and summary["model"] == model and 0 < summary["metrics"]["train/loss"] < 20


def test_the_high_resolution_job_trains_qwen3_5_moe_with_accumulation(tmp_path):
    """`python -m train experiment=hires model=tiny_qwen35_moe` (a hybrid LLM: three Gated DeltaNet layers and a
    gated-attention one, every FFN a mixture of experts with a shared expert) under gradient accumulation:
    trains with the load-balancing loss logged, evaluates, exports a directory transformers'
    Qwen3_5MoeForConditionalGeneration loads, whose logits equal ours."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    run, summary = hires_job(tmp_path, "tiny_qwen35_moe-qwen3_5_moe-dense", "model=tiny_qwen35_moe", "model.config.vision.depth=2",
                             "model.config.text.num_hidden_layers=4")
    assert summary["export_class"] == "Qwen3_5MoeForConditionalGeneration"
    metrics = summary["metrics"]
    assert metrics["eff/tower_tflops"] > metrics["eff/projector_tflops"] > 0 and metrics["train/moe_aux_loss"] > 0
    hf = Qwen3_5MoeForConditionalGeneration.from_pretrained(run / "export").eval()
    ours = MLLM.from_pretrained(run / "export").eval()
    assert ours.layer_kinds == ("linear_attention",) * 3 + ("full_attention",)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-5)


def test_the_main_job_trains_qwen3_5_and_evaluates_it_under_a_moved_selection(tmp_path):
    """`python -m train model=tiny_qwen35` trains on the default task under the default plan (ViCA: linear layers
    bypassed by visual tokens but in its T2V layers, where frozen tokens feed the recurrence from the projector
    output); `python -m train evaluate arch=fastv` on the export moves FastV's selection after the first
    full-attention layer and says so in one line."""
    cmd = [sys.executable, "-m", "train", f"paths.root_dir={tmp_path}", "run_name=q35", "model=tiny_qwen35", *DATA,
           "data.source.image_size=64", "trainer.max_steps=2", "trainer.val_check_interval=2", "model.config.vision.depth=2",
           "eval.noimage=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "q35").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["arch"] == "vica" and summary["export_class"] == "Qwen3_5ForConditionalGeneration"
    metrics = summary["metrics"]
    assert 0 < metrics["eff/flops_ratio"] < 1
    assert 0 < metrics["eff/flops_ratio/full_attention"] < metrics["eff/flops_ratio/linear_attention"] < 1  # ViCA: frozen tokens feed the recurrence
    proc, fastv = evaluate(tmp_path, "model=tiny_qwen35", "data.source.image_size=64", f"model.pretrained={run / 'export'}", "arch=fastv",
                           "eval.noimage=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranks visual tokens by layer 0's attention" in proc.stdout + proc.stderr and "moves to layer 4" in proc.stdout + proc.stderr
    assert fastv["arch"] == "fastv" and 0 < fastv["metrics"]["eff/flops_ratio"] < 1
