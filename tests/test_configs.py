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
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("model", MODELS)
def test_model_presets_compose_and_validate(model):
    cfg = compose_train([f"model={model}"])
    spec = build(cfg.model, "model")
    mcfg = spec.architecture
    assert mcfg.num_image_tokens > 0
    if model.startswith("tiny"):
        spec.build()  # small enough to construct for real


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


def test_stage_sets_llava_learning_rates():
    assert compose_train(["stage=pretrain"]).optim.lr == 1e-3
    assert compose_train(["stage=finetune"]).optim.lr == 2e-5


def test_wrong_override_key_is_rejected_by_name():
    with pytest.raises(Exception, match="hiden_size"):
        compose_train(["model.config.text.hiden_size=3"])


def test_wrong_key_in_a_preset_names_it_and_suggests_the_fix():
    cfg = compose_train()
    d = OmegaConf.to_container(cfg.model, resolve=True)
    d["config"]["text"]["hiden_size"] = 3
    with pytest.raises(ConfigError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        build(OmegaConf.create(d), "model").architecture
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
    grid, width = spec.architecture.grid_size, spec.architecture.vision["hidden_size"]
    assert torch.equal(model.vision_tower.embeddings.position_embedding.weight, sincos_2d(grid, width))
    model.vision_tower.embeddings.position_embedding.weight.data.add_(1.0)
    model.save_pretrained(tmp_path / "ckpt")  # a pretrained tower keeps its trained positions
    loaded = ModelSource(**{**cfg, "pretrained": str(tmp_path / "ckpt"), "config": {}}).build()
    assert torch.equal(loaded.vision_tower.embeddings.position_embedding.weight,
                      model.vision_tower.embeddings.position_embedding.weight)
    with pytest.raises(ConfigError, match="vision_position_init must be"):
        ModelSource(**{**cfg, "vision_position_init": "sincos"})
