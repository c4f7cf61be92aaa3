"""Every shipped preset composes, validates and (for tiny ones) builds; wrong keys fail clearly."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from models import ConfigError, MLLM, MLLMConfig
from train.builders import RunConfig, build
from train.model_source import ModelSource

CONF = str(Path(__file__).resolve().parents[1] / "conf")
MODELS = sorted(p.stem for p in Path(CONF, "model").glob("*.yaml"))
STAGES = sorted(p.stem for p in Path(CONF, "stage").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in Path(CONF, "logger").glob("*.yaml"))
DATA = sorted(p.stem for p in Path(CONF, "data").glob("*.yaml"))


def compose_train(overrides=()):
    from train.builders import register_resolvers

    register_resolvers()  # as every entry point does before Hydra composes (the data's image size is one)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("model", MODELS)
def test_model_presets_compose_and_validate(model):
    cfg = compose_train([f"model={model}"])
    spec = build(cfg.model, "model")
    mcfg = spec.mllm_config
    assert mcfg.tokens_per_image((672, 672)) > 0
    if model.startswith("tiny"):
        spec.build()  # small enough to construct for real


SMALL = 100e6  # parameters: a preset this small is meant to train here, on the default task


def parameter_count(config: MLLMConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in MLLM.from_config(config).parameters())


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_takes_the_default_task_or_says_why(model):
    """`python -m train model=<preset>` (the default task): the whole config resolves, the run's objects build and
    the task's images go through the family's preprocessing into fewer tokens than data.max_length; or, for a
    preset that cannot, one ConfigError naming the fix: images that fill max_length (data.max_length=N), or, for a
    large preset (>= 100M parameters), a shape for real weights (model.pretrained). tests/test_train.py runs each
    small preset for real."""
    from PIL import Image

    from train.builders import image_spec, register_resolvers

    register_resolvers()
    cfg = compose_train([f"model={model}"])
    for group in ("model", "data", "arch"):  # what the job resolves first (the others read Hydra's run state)
        OmegaConf.to_container(cfg[group], resolve=True)
    try:
        run = RunConfig.from_config(cfg)
    except ConfigError as e:
        small = parameter_count(build(cfg.model, "model").mllm_config) < SMALL
        assert "data.max_length=" in str(e) or (not small and "model.pretrained" in str(e)), e
        return
    spec = image_spec(run.model.mllm_config)
    for height, width in run.data.source.image_sizes():
        processed = spec.processor(Image.new("RGB", (width, height)))
        assert 0 < spec.tokens(processed.size) < run.data.max_length


def test_llava15_shapes_match_the_paper():
    """Config-only presets: parameter counts from a meta-device build (no memory, no weights)."""
    for name, n_params, n_v in [("llava15_7b", 7.06e9, 576), ("llava15_13b", 13.35e9, 576)]:
        cfg = compose_train([f"model={name}"])
        mcfg = MLLMConfig.from_dict(OmegaConf.to_container(cfg.model.config, resolve=True))
        assert mcfg.num_image_tokens == n_v
        with torch.device("meta"):
            model = MLLM.from_config(mcfg)
        total = sum(p.numel() for p in model.parameters())
        assert abs(total - n_params) / n_params < 0.01, (name, total)


@pytest.mark.parametrize("name, n_params, n_vision", [
    ("qwen3_vl_8b", 8.77e9, 0.416e9),        # the Hub card of Qwen/Qwen3-VL-8B-Instruct: 8.77B
    ("qwen3_vl_30b_a3b", 31.07e9, 0.416e9),  # Qwen/Qwen3-VL-30B-A3B-Instruct: 31.1B
    ("internvl3_5_8b", 8.5e9, 0.304e9),      # InternVL's table: 0.3B vision + 8.2B language
    # Qwen3.6-27B's model.safetensors.index.json: 27.78B (55.56 GB in bf16), with the one-layer multi-token
    # prediction head that transformers does not load (0.43B at these shapes)
    ("qwen3_5_27b", 27.78e9 - 0.43e9, 0.416e9),
    ("qwen3_5_35b_a3b", 35.0e9, 0.416e9),    # the name: 35B in all (3B active)
])
def test_qwen3_generation_shapes_match_the_released_models(name, n_params, n_vision):
    cfg = compose_train([f"model={name}"])
    mcfg = MLLMConfig.from_dict(OmegaConf.to_container(cfg.model.config, resolve=True))
    with torch.device("meta"):
        model = MLLM.from_config(mcfg)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - n_params) / n_params < 0.01, (name, total)
    assert abs(sum(p.numel() for p in model.vision_tower.parameters()) - n_vision) / n_vision < 0.01


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("logger", LOGGERS)
@pytest.mark.parametrize("data", DATA)
def test_groups_compose(stage, logger, data):
    overrides = [f"stage={stage}", f"logger={logger}", f"data={data}"]
    if data == "shards":
        overrides += ["data.source.train=/x/train.tar", "data.source.val=/x/val.tar"]
    cfg = compose_train(overrides)
    run = RunConfig.from_config(cfg)  # every config object of a run, each built once
    assert run.stage.name == stage and run.optim.lr > 0 and run.data.batch_size > 0


RECIPES = {  # LLaVA-1.5's scripts/v1_5/{pretrain,finetune,finetune_lora}.sh
    "llava15_7b_pretrain": dict(global_batch=256, lr=1e-3, projector_lr=None, strategy="deepspeed_zero2", stage="pretrain",
                                peft="none", steps=2181, grouped=False),
    "llava15_7b_finetune": dict(global_batch=128, lr=2e-5, projector_lr=None, strategy="deepspeed_zero3", stage="finetune",
                                peft="none", steps=5198, grouped=True),
    "llava15_7b_lora": dict(global_batch=128, lr=2e-4, projector_lr=2e-5, strategy="deepspeed_zero3", stage="finetune",
                            peft="lora", steps=5198, grouped=True),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("devices, nodes", [(8, 1), (2, 2), (1, 1), (4, 1)])
def test_llava_recipes_carry_the_published_hyper_parameters(recipe, devices, nodes):
    from train.builders import register_resolvers

    register_resolvers()
    want = RECIPES[recipe]
    cfg = compose_train([f"experiment={recipe}", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
    t = cfg.trainer
    assert cfg.data.batch_size * devices * nodes * t.accumulate_grad_batches == want["global_batch"]
    assert (cfg.optim.lr, cfg.optim.projector_lr, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        want["lr"], want["projector_lr"], 0.03, 0.0)
    assert cfg.optim.decay_steps is None and cfg.optim.min_lr_ratio == 0.0  # cosine to 0 over the run
    assert (cfg.strategy.name, cfg.stage.name, cfg.peft.name) == (want["strategy"], want["stage"], want["peft"])
    assert (t.max_steps, t.precision, cfg.data.max_length, cfg.model.gradient_checkpointing) == (want["steps"], "bf16-mixed", 2048, True)
    assert cfg.data._target_ == "data.datamodule.DataConfig" and cfg.data.source._target_ == "data.sources.ShardSource"
    assert cfg.data.group_by_length is want["grouped"] and cfg.model.name == "llava15_7b"
    assert OmegaConf.to_container(cfg.arch) == {"methods": {}}  # dense, as LLaVA-1.5 trained (not the main job's vica)
    if want["peft"] == "lora":
        assert (cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == (128, 256, 0.05)


def test_a_global_batch_that_does_not_divide_names_the_fix():
    from train.builders import register_resolvers

    register_resolvers()
    cfg = compose_train(["experiment=llava15_7b_finetune", "trainer.devices=3"])
    with pytest.raises(Exception, match="global_batch_size=128 is not a multiple of data.batch_size x trainer.devices"):
        cfg.trainer.accumulate_grad_batches  # resolving it (the rest of trainer needs a running Hydra job)


def test_the_main_job_is_the_default_experiment():
    """`python -m train` carries the main job's tuning (conf/experiment/main.yaml); stage/ and trainer/ hold
    none of it, and `~experiment` (no experiment; Hydra refuses experiment=null on the command line) leaves their neutral defaults."""
    main, neutral = compose_train(), compose_train(["~experiment"])
    assert (main.trainer.max_steps, main.trainer.val_check_interval) == (800, 800)
    assert (main.optim.lr, main.optim.warmup_ratio, main.optim.decay_steps) == (2e-3, 0.05, 1300)
    assert (neutral.optim.lr, neutral.optim.warmup_ratio, neutral.optim.decay_steps) == (1e-3, 0.03, None)
    for stage in STAGES:  # a stage says what trains, nothing else
        assert set(OmegaConf.load(Path(CONF, "stage", f"{stage}.yaml"))) == {"stage"}


def test_wrong_override_key_is_rejected_by_name():
    with pytest.raises(Exception, match="hiden_size"):
        compose_train(["model.config.text.hiden_size=3"])


def test_wrong_key_in_a_preset_names_it_and_suggests_the_fix():
    cfg = compose_train()
    d = OmegaConf.to_container(cfg.model, resolve=True)
    d["config"]["text"]["hiden_size"] = 3
    with pytest.raises(ConfigError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        build(OmegaConf.create(d), "model").mllm_config
    d = OmegaConf.to_container(cfg.model, resolve=True)
    d["pretrainde"] = "/x"
    with pytest.raises(ConfigError, match="did you mean 'pretrained'"):
        build(OmegaConf.create(d), "model")
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        build(OmegaConf.create({"_target_": "train.optim.OptimConfig", "lrr": 1.0}), "optim")


def test_invalid_values_fail_at_config_time():
    from tests.helpers import tiny_config

    with pytest.raises(ConfigError, match="SigLIP has no CLS"):
        tiny_config(vision="siglip", vision_feature_select_strategy="default")
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        tiny_config(vision_feature_layer=-5)
    with pytest.raises(ConfigError, match="image_token_id"):
        tiny_config(image_token_id=999)


def test_sincos_vision_positions_for_towers_built_from_config(tmp_path):
    from models.vision import sincos_2d

    table = sincos_2d(4, 8)
    assert table.shape == (16, 8)
    assert torch.equal(table[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))  # patch (0, 0): sin 0, cos 0
    assert torch.equal(table[1, :4], table[0, :4]) and not torch.equal(table[1, 4:], table[0, 4:])  # same row
    assert torch.equal(table[4, 4:], table[0, 4:]) and not torch.equal(table[4, :4], table[0, :4])  # same column

    cfg = OmegaConf.to_container(compose_train([]).model, resolve=True)
    cfg.pop("_target_")
    spec = ModelSource(**cfg)
    assert spec.vision_position_init == "sincos2d"
    model = spec.build()
    grid, width = spec.mllm_config.grid_size, spec.mllm_config.vision["hidden_size"]
    assert torch.equal(model.vision_tower.embeddings.position_embedding.weight, sincos_2d(grid, width))
    model.vision_tower.embeddings.position_embedding.weight.data.add_(1.0)
    model.save_pretrained(tmp_path / "ckpt")  # a pretrained tower keeps its trained positions
    loaded = ModelSource(**{**cfg, "pretrained": str(tmp_path / "ckpt"), "config": {}}).build()
    assert torch.equal(loaded.vision_tower.embeddings.position_embedding.weight,
                      model.vision_tower.embeddings.position_embedding.weight)
    with pytest.raises(ConfigError, match="vision_position_init must be"):
        ModelSource(**{**cfg, "vision_position_init": "sincos"})


QWEN3_RECIPES = {  # Qwen's qwen-vl-finetune README (full and TRL LoRA); InternVL's internvl3_5_8b_sft.sh
    "qwen3_vl_8b_finetune": dict(model="qwen3_vl_8b", global_batch=128, lr=1e-6, projector_lr=1e-5, weight_decay=0.01,
                                 strategy="deepspeed_zero3", stage="finetune", peft="none", max_length=4096),
    "qwen3_vl_8b_lora": dict(model="qwen3_vl_8b", global_batch=4, lr=2e-5, projector_lr=None, weight_decay=0.0,
                             strategy="auto", stage="finetune", peft="lora", max_length=4096),
    "qwen3_vl_30b_a3b_finetune": dict(model="qwen3_vl_30b_a3b", global_batch=128, lr=1e-6, projector_lr=1e-5, weight_decay=0.01,
                                      strategy="deepspeed_zero3", stage="finetune", peft="none", max_length=4096),
    "internvl3_5_8b_finetune": dict(model="internvl3_5_8b", global_batch=512, lr=8e-5, projector_lr=None, weight_decay=0.05,
                                    strategy="deepspeed_zero3", stage="scratch", peft="none", max_length=32768),
}


@pytest.mark.parametrize("recipe", sorted(QWEN3_RECIPES))
def test_qwen3_generation_recipes_carry_the_published_hyper_parameters(recipe):
    from train.builders import register_resolvers

    register_resolvers()
    want = QWEN3_RECIPES[recipe]
    devices = 1 if want["strategy"] == "auto" else 8
    cfg = compose_train([f"experiment={recipe}", f"trainer.devices={devices}", "trainer.max_steps=100"])
    assert cfg.model.name == want["model"] and cfg.data.packing is True and cfg.data.max_length == want["max_length"]
    assert cfg.data.batch_size * devices * cfg.trainer.accumulate_grad_batches == want["global_batch"]
    assert (cfg.optim.lr, cfg.optim.projector_lr, cfg.optim.weight_decay, cfg.optim.warmup_ratio) == (
        want["lr"], want["projector_lr"], want["weight_decay"], 0.03)
    assert (cfg.strategy.name, cfg.stage.name, cfg.peft.name) == (want["strategy"], want["stage"], want["peft"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing is True
    if recipe.startswith("qwen3"):
        assert dict(cfg.model.preprocessing) == {"min_pixels": 12544, "max_pixels": 451584}
    if want["peft"] == "lora":
        assert (cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == (64, 16, 0.05)
    with pytest.raises(Exception, match="model.pretrained is required"):
        cfg.model.pretrained


QWEN3_5_RECIPES = {  # ms-swift's examples/models/qwen3_5/transformers.sh (LoRA) and mcore_full.sh (full)
    "qwen3_5_35b_a3b_lora": dict(lr=1e-4, min_lr_ratio=0.0, peft="lora", batch_size=4, devices=4, max_length=2048),
    "qwen3_5_35b_a3b_finetune": dict(lr=1e-5, min_lr_ratio=0.1, peft="none", batch_size=1, devices=8, max_length=16384),
}


@pytest.mark.parametrize("recipe", sorted(QWEN3_5_RECIPES))
def test_qwen3_5_recipes_carry_the_published_hyper_parameters(recipe):
    """Global batch 16, warmup 0.05, grouped by length, tower and merger frozen, 1,003,520 pixels, and LoRA r 8 /
    alpha 32 on every linear layer of the hybrid LLM (Gated DeltaNet's projections and the shared expert's gate too)."""
    from train.builders import register_resolvers

    register_resolvers()
    want = QWEN3_5_RECIPES[recipe]
    cfg = compose_train([f"experiment={recipe}", f"trainer.devices={want['devices']}", "trainer.max_steps=100"])
    assert cfg.model.name == "qwen3_5_35b_a3b" and cfg.data.group_by_length is True and cfg.data.max_length == want["max_length"]
    assert cfg.data.batch_size == want["batch_size"]
    assert cfg.data.batch_size * want["devices"] * cfg.trainer.accumulate_grad_batches == 16
    assert (cfg.optim.lr, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio) == (want["lr"], 0.05, want["min_lr_ratio"])
    assert (cfg.stage.train_vision, cfg.stage.train_projector, cfg.stage.train_llm) == (False, False, True)
    assert cfg.peft.name == want["peft"] and cfg.strategy.name == "deepspeed_zero3" and cfg.trainer.precision == "bf16-mixed"
    assert dict(cfg.model.preprocessing) == {"max_pixels": 1003520}
    if want["peft"] == "lora":
        assert (cfg.peft.r, cfg.peft.alpha) == (8, 32) and {"in_proj_qkv", "out_proj", "shared_expert_gate"} <= set(cfg.peft.target_modules)


def test_lora_adapts_every_linear_layer_of_a_hybrid_llm():
    """The LoRA recipe's targets exist in the tiny Qwen3.5-MoE (`inject_lora` refuses names that match nothing)
    and its forward runs through the adapters, Gated DeltaNet's projections included: equal to the base model
    while B is zero, different once B is not."""
    from models import MLLM
    from tests.helpers import qwen_batch, tiny_qwen3_5_config
    from train.peft import PeftConfig, inject_lora

    targets = list(OmegaConf.load(Path(CONF) / "experiment" / "qwen3_5_35b_a3b_lora.yaml").peft.target_modules)
    torch.manual_seed(0)
    model = MLLM.from_config(tiny_qwen3_5_config(moe=True)).eval()
    ids, mask, pixels, grids, _ = qwen_batch(model.config)
    with torch.no_grad():
        before = model(ids, mask, pixels, logits="last", image_sizes=grids).logits
    inject_lora(model, PeftConfig(name="lora", r=8, alpha=32, dropout=0.0, target_modules=targets))
    with torch.no_grad():
        assert torch.allclose(model(ids, mask, pixels, logits="last", image_sizes=grids).logits, before, atol=1e-6)
        for layer in model.language_model.layers[:3]:  # Gated DeltaNet layers only
            torch.nn.init.normal_(layer.linear_attn.in_proj_qkv.lora_B["default"].weight, std=0.1)
        assert not torch.allclose(model(ids, mask, pixels, logits="last", image_sizes=grids).logits, before, atol=1e-3)


def test_preprocessing_bounds_apply_to_a_checkpoint(tmp_path):
    """`model.preprocessing` replaces a loaded checkpoint's resolution bounds (what the data path resizes
    to and what the export records), and unknown keys are refused."""
    import torch

    from models import MLLM
    from tests.helpers import tiny_qwen3_vl_config
    from train.model_source import ModelSource

    MLLM.from_config(tiny_qwen3_vl_config()).save_pretrained(tmp_path / "ckpt")
    source = ModelSource(name="x", pretrained=str(tmp_path / "ckpt"), preprocessing={"min_pixels": 1024, "max_pixels": 2048})
    assert (source.mllm_config.min_pixels, source.mllm_config.max_pixels) == (1024, 2048)
    model = source.build()
    assert (model.config.min_pixels, model.config.max_pixels) == (1024, 2048)
    assert isinstance(next(model.parameters()), torch.Tensor)
    with pytest.raises(ConfigError, match="model.preprocessing: unknown key"):
        ModelSource(name="x", preprocessing={"max_pixel": 1})
