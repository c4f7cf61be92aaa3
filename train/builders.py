"""From the composed Hydra config to the objects a run is made of.

One idiom for every config node: a `_target_` names the class, Hydra instantiates it, and our
classes (dataclasses) validate their own values in `__post_init__`. `build` adds what Hydra's
errors lack: unknown keys named with the closest valid spelling, and our `ConfigError`s surfacing
as themselves. The training job (`train/run.py`) and the tools (`train/tools/`) both build from here;
nothing here imports the job's entry point.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from data.chat import ChatTokenizer
from data.datamodule import DataConfig, ImageSpec, MLLMDataModule, SampleEncoder
from data.synthetic import MIN_IMAGE_SIZE
from models.config import ConfigError, check_keys
from models.methods import arch_name
from models.plan import Plan

from .evaluation import EvalConfig
from .infra.checkpoint_io import AtomicCheckpointIO
from .infra.preemption import cluster_plugins
from .infra.ranks import log_rank
from .infra.shared_dir import SharedRunDir
from .model_source import ModelSource
from .module import MLLMModule
from .nonfinite import NonFiniteGuard
from .optim import OptimConfig
from .peft import PeftConfig
from .stage import StageConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the Hydra config tree
HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}


def register_resolvers() -> None:
    """OmegaConf resolvers the config tree uses (`${arch_name:${arch}}` names run directories,
    `${accumulation:...}` turns a recipe's global batch into gradient accumulation); called by every
    entry point before Hydra composes."""
    OmegaConf.register_new_resolver("arch_name", run_dir_arch_name, replace=True)
    OmegaConf.register_new_resolver("accumulation", accumulation, replace=True)
    OmegaConf.register_new_resolver("required", required, replace=True)
    OmegaConf.register_new_resolver("task_image_size", task_image_size, replace=True)


def task_image_size(tower_size: int | None) -> int:
    """`${task_image_size:${oc.select:model.config.vision.image_size,null}}`: the side of the synthetic
    task's scenes for a model: its tower's input size, at least the task's smallest scene (64 px). So a
    tiling family's 32 px tiles see a 64 px image as 2 x 2 tiles, and a tower without a fixed input
    size (Qwen's dynamic resolution) sees 64 px images at full resolution."""
    return max(MIN_IMAGE_SIZE, int(tower_size or 0))


def required(key: str, what: str):
    """`${required:model.pretrained,'a llava directory'}`: a value a recipe cannot do without. (A recipe
    cannot use `???` for a key its groups already set: merging `???` keeps the group's value.)"""
    raise ConfigError(f"{key} is required here: {what}; set {key}=... on the command line")


def accumulation(global_batch: int, micro_batch: int, devices, num_nodes: int) -> int:
    """Micro-batches per optimizer step so that `global_batch` samples make one step on
    `devices` x `num_nodes` processes of `micro_batch` samples (the recipes' `global_batch_size`)."""
    if not isinstance(devices, int) or isinstance(devices, bool):
        raise ConfigError(f"global_batch_size={global_batch} needs trainer.devices as a number of devices per node, got {devices!r}")
    per_step = micro_batch * devices * num_nodes
    if per_step <= 0 or global_batch % per_step:
        raise ConfigError(
            f"global_batch_size={global_batch} is not a multiple of data.batch_size x trainer.devices x trainer.num_nodes "
            f"= {micro_batch} x {devices} x {num_nodes} = {per_step}; change data.batch_size (or global_batch_size)"
        )
    return global_batch // per_step


def run_dir_arch_name(arch) -> str:
    """`arch_name` for naming the run directory. A bad arch (e.g. a plan file that is not valid YAML)
    is named `invalid_arch` here, so that the job starts and reports the ConfigError itself (Hydra
    would print it inside an interpolation traceback)."""
    try:
        return arch_name(arch)
    except ConfigError:
        return "invalid_arch"


def build(node: DictConfig, where: str):
    """Instantiate the config node at `where` (its `_target_` with the node's values)."""
    if node is None or "_target_" not in node:
        raise ConfigError(f"{where} needs a `_target_` naming the class it configures")
    target = get_object(node._target_)
    if dataclasses.is_dataclass(target):
        allowed = {f.name for f in dataclasses.fields(target)} | HYDRA_KEYS
        check_keys(dict(node), allowed, where)
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        raise (cause or ConfigError(f"{where}: {e}")) from None


@dataclass
class RunConfig:
    """A training run's config objects, each built once from the composed config."""

    model: ModelSource
    plan: Plan
    data: DataConfig
    optim: OptimConfig
    stage: StageConfig
    peft: PeftConfig
    evaluation: EvalConfig
    nonfinite: NonFiniteGuard

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunConfig":
        model, plan = model_and_plan(cfg)
        model.check_task_tokenizer()
        data = build(cfg.data, "data")
        check_images_fit(model, data)
        return cls(
            model=model,
            plan=plan,
            data=data,
            optim=build(cfg.optim, "optim"),
            stage=build(cfg.stage, "stage"),
            peft=build(cfg.peft, "peft"),
            evaluation=build(cfg.eval, "eval"),
            nonfinite=build(cfg.nonfinite, "nonfinite"),
        )


def check_images_fit(model: ModelSource, data: DataConfig) -> None:
    """Refuse, before any data work, a task whose images alone fill `data.max_length` with this model's
    visual tokens: every sample would be skipped as too long."""
    for size in data.source.image_sizes() or []:
        tokens = model.mllm_config.tokens_per_image(size)
        if tokens >= data.max_length:
            raise ConfigError(
                f"model={model.name} gives an image of the task ({size[0]} x {size[1]} px) {tokens} visual tokens, which "
                f"leaves no room for its conversation in data.max_length={data.max_length}: every sample would be skipped "
                f"as too long. Raise it for this model: data.max_length={1 << (tokens + 256).bit_length()}")


def model_and_plan(cfg: DictConfig) -> tuple[ModelSource, Plan]:
    """The model source and its resolved plan (a bad plan fails here, before any data work)."""
    model = build(cfg.model, "model")
    model.check_weights()
    arch = cfg.get("arch")
    return model, model.plan(None if arch is None else OmegaConf.to_container(arch, resolve=True))


def build_data(model: ModelSource, data: DataConfig, data_dir: str | Path, seed: int = 0):
    """Prepare shards (generating the synthetic task if needed), the tokenizer and the data module."""
    shards = data.source.prepare()
    tokenizer = model.load_tokenizer(shards.texts, Path(data_dir) / "tokenizers", videos=shards.videos)
    arch = model.mllm_config
    chat = ChatTokenizer(tokenizer, model.chat_template, None, data.max_length, model.system_prompt, arch.model_family.image_wrap,
                         arch.image_token_id, video_token_id(arch), arch.model_family.frame_timestamps)
    image = image_spec(arch, model.max_images_per_sample)
    dm = MLLMDataModule(
        shards.train,
        shards.val,
        SampleEncoder(chat, image),
        pad_id=tokenizer.pad_token_id,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=seed,
        group_by_length=data.group_by_length,
        group_buffer_batches=data.group_buffer_batches,
        packing=data.packing,
        max_length=data.max_length,
        pack_buffer=data.pack_buffer,
    )
    return tokenizer, dm


def image_spec(config, max_images_per_sample: int | None = None) -> ImageSpec:
    """What the data module needs of the model's images: its family's preprocessing and token counts
    (and its video preprocessing, when it takes video)."""
    video = config.model_family.video_processor(config) if video_token_id(config) is not None else None
    return ImageSpec(config.model_family.image_processor(config), config.tokens_per_image, max_images_per_sample, video)


def video_token_id(config) -> int | None:
    """The placeholder id of a video's tokens, None for a family that takes no video."""
    ids = config.visual_token_ids
    return ids[1] if len(ids) > 1 else None


def build_module(run: RunConfig, tokenizer) -> MLLMModule:
    return MLLMModule(run.model, run.plan, tokenizer, run.optim, run.stage, run.peft, run.evaluation, run.nonfinite)


def resolve_precision(precision):
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def build_strategy(cfg: DictConfig):
    """`name` alone selects a Lightning strategy by name; with `_target_` the rest are its arguments."""
    if "_target_" not in cfg:
        return cfg.name
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    kwargs.pop("name", None)
    return instantiate(kwargs)


def build_trainer(cfg: DictConfig, extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.logger else False
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] if cfg.callbacks else []
    trainer = instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision),
        strategy=build_strategy(cfg.strategy),
        logger=loggers,
        callbacks=[*callbacks, *extra_callbacks, SharedRunDir()],  # a multi-node run directory must be shared
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],  # atomic saves; Slurm without Lightning's in-handler requeue
    )
    log_rank(trainer)  # each rank names its host, ranks and rendezvous before the ranks meet (train/infra/ranks.py)
    return trainer
