"""The original LLaVA checkpoint layout (haotian-liu/LLaVA, and the codebases built on it: MobileVLM,
the p-MoD and gamma-MoD releases, ...), read and written next to llava-hf's.

The model is the same; only the files differ. A directory of the original layout has

* a flat Llama `config.json` (`model_type` `llava_llama` or `mobilevlm`) with the multimodal fields
  `mm_vision_tower` (the CLIP the model was trained with: a Hub name or a path), `mm_hidden_size` (its
  width), `mm_projector_type` (`linear`, `mlp2x_gelu`; MobileVLM V2's `ldpnetv2`),
  `mm_vision_select_layer` and `mm_vision_select_feature` (`patch` drops CLS, `cls_patch` keeps it);
* weights named `model.embed_tokens.*`, `model.layers.*`, `model.norm.*`, `lm_head.*` (a plain Llama
  checkpoint) and `model.mm_projector.*` (an `nn.Sequential`: `0.` and `2.` for `mlp2x_gelu`; MobileVLM's
  `mlp.mlp.0.`, `mlp.mlp.2.`, `peg.peg.0.`); the tower's own `model.vision_tower.vision_tower.vision_model.*`
  when training saved it (LLaVA-1.5's releases do; they are the frozen CLIP's);
* no tower config: the vision tower is the CLIP directory `mm_vision_tower` names, which the user gives
  (`vision_tower=`) when it is not a local path already.

Reading turns such a directory into today's layout (`read_config`: a config.json dict with
`vision_config` / `text_config`, the family `llava` for `linear` / `mlp2x_gelu`, `mobilevlm` for
`ldpnetv2`) and its weights into our module names (`read_state_dict`, `read_shapes`): the tower's from
its CLIP directory, replaced by the checkpoint's own where it has them. Writing (`write_checkpoint`) puts
the tower in a CLIP directory `vision_tower/` inside the checkpoint, which `mm_vision_tower` names by its
absolute path. Other directories pass through these readers unchanged.

The original layout has no image token in its vocabulary (LLaVA splices the visual tokens in at id
-200); our placeholders need an id, so a config.json we write records `image_token_index`, and one
without it takes `PLACEHOLDER_ID` (0: Llama's `<unk>`, which its byte-fallback tokenizer never produces
from text).
"""

from __future__ import annotations

import json
from pathlib import Path
import torch
from transformers import LlamaConfig

from . import checkpoint
from .validation import ConfigError

PLACEHOLDER_ID = 0
TOWER_DIR = "vision_tower"  # where write_checkpoint puts the tower's CLIP directory
FAMILY_OF_PROJECTOR = {"linear": "llava", "mlp2x_gelu": "llava", "ldpnetv2": "mobilevlm"}
MODEL_TYPES = {"llava": ("llava_llama", "LlavaLlamaForCausalLM"), "mobilevlm": ("mobilevlm", "MobileLlamaForCausalLM")}
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> vision_feature_select_strategy
TOWER_TYPES = {"clip": "clip_vision_model", "clip_vision_model": "clip_vision_model",
               "siglip": "siglip_vision_model", "siglip_vision_model": "siglip_vision_model"}
MULTIMODAL_KEYS = {  # flat config.json keys that are not the Llama config's
    "model_type", "architectures", "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type", "mm_projector_lr",
    "mm_vision_tower_lr", "image_aspect_ratio", "image_grid_pinpoints", "use_mm_proj", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "tokenizer_model_max_length", "tokenizer_padding_side",
    "vision_tower_type", "image_token_index", "efficient_mllm", "transformers_version", "torch_dtype", "dtype", "s2",
}

# weight names: (ours, original); the projector's depend on its kind
SHARED_NAMES = [
    ("language_model.embed_tokens.", "model.embed_tokens."),
    ("language_model.layers.", "model.layers."),
    ("language_model.norm.", "model.norm."),
    ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("lm_head.", "lm_head."),
]
PROJECTOR_NAMES = {
    "linear": [("multi_modal_projector.linear_1.", "model.mm_projector.")],
    "mlp2x_gelu": [("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                   ("multi_modal_projector.linear_2.", "model.mm_projector.2.")],
    "ldpnetv2": [("multi_modal_projector.linear_1.", "model.mm_projector.mlp.mlp.0."),
                 ("multi_modal_projector.linear_2.", "model.mm_projector.mlp.mlp.2."),
                 ("multi_modal_projector.peg.", "model.mm_projector.peg.peg.0.")],
}
ORIGINAL_TOWER = "model.vision_tower.vision_tower."


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src):]
    return key  # our own modules (gated cross-attention blocks) keep their names


def to_original(key: str, projector: str) -> str:
    """Our module name -> the original layout's weight name."""
    return _rename(key, PROJECTOR_NAMES[projector] + SHARED_NAMES)


def to_internal(key: str, projector: str) -> str:
    """The original layout's weight name -> ours (ours pass unchanged)."""
    return _rename(key, [(b, a) for a, b in PROJECTOR_NAMES[projector] + SHARED_NAMES])


def is_original(hf: dict) -> bool:
    """Whether a config.json dict is the original layout's (flat, with `mm_vision_tower`)."""
    return "mm_vision_tower" in hf and "vision_config" not in hf


# --- reading -----------------------------------------------------------------------------------
def read_config(path, vision_tower=None, what: str = "model.pretrained") -> dict:
    """The config.json of a checkpoint directory in today's layout: llava-hf's (and every family's) as
    it is, the original layout's rebuilt with its tower's config (`tower_directory`)."""
    hf = checkpoint.read_config(path, what)
    if not is_original(hf):
        if vision_tower:
            raise ConfigError(f"vision_tower={vision_tower!r} is for checkpoints of the original LLaVA layout (a flat config.json "
                              f"with mm_vision_tower); {path} holds its own vision tower: leave vision_tower unset")
        return hf
    return current_config(hf, Path(path), tower_directory(hf, path, vision_tower))


def read_state_dict(path, vision_tower=None) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: on-disk names for today's layout (the family's adapter renames them), our
    module names for the original layout, the tower's taken from its CLIP directory unless the checkpoint
    holds them."""
    hf = checkpoint.read_config(path)
    if not is_original(hf):
        return checkpoint.read_state_dict(path)
    tower = tower_directory(hf, path, vision_tower)
    projector = _projector(hf, path)
    state = {to_internal(k, projector): v for k, v in checkpoint.read_state_dict(path).items()}
    own = {k for k in state if k.startswith("vision_tower.")}
    tower_state = {"vision_tower." + k: v for k, v in tower_weights(checkpoint.read_state_dict(tower)).items()}
    _check_tower_fits({k: tuple(state[k].shape) for k in own}, {k: tuple(v.shape) for k, v in tower_state.items()}, path, tower)
    return {**tower_state, **state}


def read_shapes(path, vision_tower=None) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes from the safetensors headers (None for torch .bin weights), named as `read_state_dict` names them."""
    hf = checkpoint.read_config(path)
    shapes = checkpoint.read_shapes(path)
    if not is_original(hf) or shapes is None:
        return shapes
    tower = tower_directory(hf, path, vision_tower)
    tower_shapes = checkpoint.read_shapes(tower)
    if tower_shapes is None:
        return None
    projector = _projector(hf, path)
    shapes = {to_internal(k, projector): v for k, v in shapes.items()}
    tower_shapes = {"vision_tower." + k: v for k, v in tower_weights(tower_shapes).items()}
    _check_tower_fits({k: v for k, v in shapes.items() if k.startswith("vision_tower.")}, tower_shapes, path, tower)
    return {**tower_shapes, **shapes}


def tower_weights(state: dict) -> dict:
    """A CLIP / SigLIP directory's vision-tower tensors under the tower's own names: a full CLIP's (and an
    older CLIPVisionModel's) `vision_model.*`, or transformers 5's CLIPVisionModel, whose names are already
    the tower's."""
    return {k.split("vision_model.", 1)[1]: v for k, v in state.items() if "vision_model." in k} or state


def _check_tower_fits(own: dict, tower: dict, path, tower_dir) -> None:
    wrong = [f"{k} {list(v)} vs {list(tower[k])}" for k, v in own.items() if k in tower and tuple(tower[k]) != tuple(v)]
    missing = [k for k in own if k not in tower]
    if wrong or missing:
        raise ConfigError(f"the vision tower weights in {path} do not fit the tower directory {tower_dir} "
                          f"({'; '.join(wrong[:3] or missing[:3])}): give the CLIP directory the checkpoint was trained with "
                          "(vision_tower=<dir>)")


def tower_directory(hf: dict, path, vision_tower=None) -> Path:
    """The tower's CLIP directory: `vision_tower` when given, else `mm_vision_tower` when it is a local
    directory (as given, or relative to the checkpoint); one error naming both otherwise."""
    named = hf.get("mm_vision_tower")
    candidates = [Path(vision_tower).expanduser()] if vision_tower else [Path(named).expanduser(), Path(path) / str(named)]
    for tower in candidates:
        if (tower / "config.json").is_file():
            return tower
    if vision_tower:
        raise ConfigError(f"vision_tower={str(vision_tower)!r} is not a CLIP directory (no config.json there); {path} was "
                          f"trained with mm_vision_tower={named!r}: point vision_tower at a local copy of it")
    raise ConfigError(f"{path} is a checkpoint of the original LLaVA layout, whose vision tower is not in it: its "
                      f"mm_vision_tower={named!r} is no local directory. Download that CLIP and give its directory as "
                      "vision_tower=<dir> (model.vision_tower=<dir>; lmms-eval: --model_args pretrained=...,vision_tower=<dir>)")


def _projector(hf: dict, path) -> str:
    kind = hf.get("mm_projector_type", "linear")  # LLaVA's default
    if kind not in FAMILY_OF_PROJECTOR:
        raise ConfigError(f"{path}: mm_projector_type {kind!r} is not supported (linear, mlp2x_gelu: LLaVA; ldpnetv2: MobileVLM V2)")
    return kind


def current_config(hf: dict, path: Path, tower: Path) -> dict:
    """The original layout's flat config.json `hf` as today's layout, the tower's config from `tower`."""
    projector = _projector(hf, path)
    if hf.get("model_type") not in ("llava_llama", "llava", "mobilevlm"):
        raise ConfigError(f"{path}: original-layout model_type {hf.get('model_type')!r} is not read; llava_llama and "
                          "mobilevlm (Llama LLMs) are")
    for key, ok in (("mm_use_im_start_end", False), ("image_aspect_ratio", "pad")):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"{path}: {key}={hf[key]!r} is not supported ({key}={ok!r} is: LLaVA-1.5, MobileVLM V2)")
    if hf.get("mm_patch_merge_type", "flat") != "flat":
        raise ConfigError(f"{path}: mm_patch_merge_type={hf['mm_patch_merge_type']!r} (LLaVA-NeXT's anyres) is not read in the "
                          "original layout; convert the checkpoint to llava-hf's llava_next format")
    select = hf.get("mm_vision_select_feature", "patch")
    if select not in SELECT_FEATURE:
        raise ConfigError(f"{path}: mm_vision_select_feature={select!r} is not supported (patch, cls_patch)")
    if "mm_vision_select_layer" not in hf:
        raise ConfigError(f"{path}: config.json has mm_vision_tower but no mm_vision_select_layer")
    vision = _tower_config(tower, path)
    if hf.get("mm_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
        raise ConfigError(f"{path} was trained with a vision tower of width mm_hidden_size={hf['mm_hidden_size']} "
                          f"(mm_vision_tower={hf['mm_vision_tower']!r}) but the tower directory {tower} is {vision['hidden_size']} "
                          "wide: give the CLIP directory the checkpoint names")
    text = LlamaConfig(**{k: v for k, v in hf.items() if k not in MULTIMODAL_KEYS}).to_dict()  # old keys (rope_theta) read as Llama does
    text["model_type"] = "llama"
    ours = dict(hf.get("efficient_mllm", {}))
    ours["projector"] = projector
    processor = tower / "preprocessor_config.json"
    if processor.is_file():  # the tower's normalisation (CLIP's statistics for a CLIP)
        stats = json.loads(processor.read_text())
        ours.update({k: stats[k] for k in ("image_mean", "image_std") if k in stats})
    return {
        "model_type": FAMILY_OF_PROJECTOR[projector],
        "vision_config": vision,
        "text_config": text,
        "vision_feature_layer": hf["mm_vision_select_layer"],
        "vision_feature_select_strategy": SELECT_FEATURE[select],
        "image_token_index": hf.get("image_token_index", PLACEHOLDER_ID),
        "efficient_mllm": ours,
    }


def _tower_config(tower: Path, path) -> dict:
    config = json.loads((tower / "config.json").read_text())
    kind = TOWER_TYPES.get(config.get("model_type"))
    if kind is None:
        raise ConfigError(f"the vision tower directory {tower} (for {path}) holds a {config.get('model_type')!r} model, not a CLIP "
                          "(clip, clip_vision_model) or SigLIP; give the CLIP directory the checkpoint was trained with")
    section = dict(config.get("vision_config", config)) if config.get("model_type") in ("clip", "siglip") else config
    section["model_type"] = kind
    return section


# --- writing -----------------------------------------------------------------------------------
def flat_config(current: dict, tower: Path) -> dict:
    """Today's layout `current` (what `MLLMConfig.to_hf_dict` gives, our `efficient_mllm` section
    included) as the original layout's flat config.json, its tower the CLIP directory `tower`."""
    family = current["model_type"]
    ours = dict(current.get("efficient_mllm", {}))
    projector = ours.get("projector", "mlp2x_gelu")
    if FAMILY_OF_PROJECTOR.get(projector) != family:
        raise ConfigError(f"a {family} model with projector {projector!r} has no original-layout form (linear, mlp2x_gelu: "
                          "llava; ldpnetv2: mobilevlm)")
    strategy = {v: k for k, v in SELECT_FEATURE.items()}[current["vision_feature_select_strategy"]]
    model_type, architecture = MODEL_TYPES[family]
    text = {k: v for k, v in current["text_config"].items() if k not in ("model_type", "architectures", "transformers_version")}
    return {
        **text,
        "model_type": model_type,
        "architectures": [architecture],
        "mm_vision_tower": str(tower.resolve()),
        "mm_hidden_size": current["vision_config"]["hidden_size"],
        "mm_projector_type": projector,
        "mm_vision_select_layer": current["vision_feature_layer"],
        "mm_vision_select_feature": strategy,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
        "image_token_index": current["image_token_index"],
        **({"vision_tower_type": "clip"} if family == "mobilevlm" else {}),  # what MobileVLM's loader asks for
        **({"dtype": current["dtype"]} if "dtype" in current else {}),
        "efficient_mllm": ours,
    }


def tower_files(current: dict) -> tuple[dict, dict]:
    """The tower's CLIP directory files from today's layout: its config.json (a `CLIPVisionModel`) and
    preprocessor_config.json (a `CLIPImageProcessor`: LLaVA pads to a square before it)."""
    vision = dict(current["vision_config"])
    vision["architectures"] = ["CLIPVisionModel" if vision["model_type"] == "clip_vision_model" else "SiglipVisionModel"]
    size = vision["image_size"]
    ours = current.get("efficient_mllm", {})
    processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(ours.get("image_mean", (0.5,) * 3)), "image_std": list(ours.get("image_std", (0.5,) * 3)),
        "do_convert_rgb": True,
    }
    return vision, processor


def write_checkpoint(path, state: dict[str, torch.Tensor], current: dict, max_shard_size: str = "5GB") -> Path:
    """Write the original layout: `state` under the original names (`to_original`; the tower's part goes
    to the CLIP directory `path/vision_tower`, as `vision_model.*`), `current` (today's config.json
    dict) as the flat config that names that directory."""
    path = Path(path)
    tower = path / TOWER_DIR
    main = {k: v for k, v in state.items() if not k.startswith(ORIGINAL_TOWER)}
    vision = {"vision_model." + k[len(ORIGINAL_TOWER + "vision_model."):]: v for k, v in state.items() if k.startswith(ORIGINAL_TOWER)}
    checkpoint.write_checkpoint(path, main, flat_config(current, tower), max_shard_size)
    vision_config, processor = tower_files(current)
    checkpoint.write_checkpoint(tower, vision, vision_config, max_shard_size)
    (tower / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return path


def original_state(state: dict[str, torch.Tensor], current: dict) -> dict[str, torch.Tensor]:
    """Tensors under our module names renamed to the original layout's (for `write_checkpoint`)."""
    projector = current.get("efficient_mllm", {}).get("projector", "mlp2x_gelu")
    return {to_original(k, projector): v for k, v in state.items()}
