"""MLLM: vision tower -> projector -> causal LM decoder whose forward we own.

Weights and module names are HF's (CLIP/SigLIP vision model, `LlamaModel`/`Qwen2Model`, `lm_head`),
so llava-hf checkpoints load and our exports load back into `LlavaForConditionalGeneration`.
The image is given as `n_v` `<image>` placeholder tokens per image in `input_ids` (the llava-hf
processor layout); the model replaces them with projected patch features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.initialization import no_init_weights

from . import checkpoint
from .blind_scores import image_keys_for
from .config import MLLMConfig
from .gathered import gathered, hf_from_config, load_state_dict
from .decoder import DecodeState, LayerHook, PlannedDecoderLayer, run_decoder
from .plan import Plan
from .projector import Projector
from .pruning import cls_knee_keep, features_and_dominance, pool_tokens, top_keep
from .streams import Layout, Stream, empty_like_visual
from .vision import build_vision_tower, image_features
from .xattn import GatedCrossAttention


class ImageTokenMismatch(ValueError):
    """The number of `<image>` tokens does not match the images given."""


@dataclass
class MLLMOutput:
    loss: Tensor | None = None
    logits: Tensor | None = None  # [B, L, V] ("all"), [B, V] ("last") or None
    n_loss_tokens: int = 0
    cache: "DecodeState | None" = None


class MLLM(nn.Module):
    """`plan` decides what visual tokens cost in each decoder layer (dense by default)."""

    def __init__(self, config: MLLMConfig, plan: Plan | None = None):
        super().__init__()
        self.config = config
        vision_cfg, text_cfg = config.hf_vision_config(), config.hf_text_config()
        self.text_config = text_cfg
        self.vision_tower = build_vision_tower(vision_cfg)
        self.multi_modal_projector = Projector(config.projector, vision_cfg.hidden_size, text_cfg.hidden_size)
        self.language_model = hf_from_config(text_cfg)
        self.language_model.layers = nn.ModuleList(PlannedDecoderLayer(layer) for layer in self.language_model.layers)
        self.lm_head = nn.Linear(text_cfg.hidden_size, text_cfg.vocab_size, bias=False)
        self.xattn = nn.ModuleDict()
        self.gradient_checkpointing = False
        self._init_new_weights(text_cfg.initializer_range)
        if text_cfg.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.plan = Plan.dense(text_cfg.num_hidden_layers)
        self.set_plan(plan or self.plan)

    def set_plan(self, plan: Plan) -> None:
        """Switch the visual-compute plan (training-free plans can change at any time). Gated
        cross-attention blocks the plan needs are created zero-gated, i.e. as identities."""
        n = self.text_config.num_hidden_layers
        if len(plan.layers) != n:
            raise ValueError(f"plan {plan.name!r} has {len(plan.layers)} layers but the LLM has {n}")
        plan.validate(self.text_config.num_attention_heads)
        if plan.pre_llm is not None and plan.pre_llm.method == "cls_knee" and not self.config.has_cls:
            raise ValueError(f"plan {plan.name!r} prunes by CLS similarity, but the {self.config.vision_family} tower has no CLS token")
        if plan.needs_patch_grid and self.config.num_image_tokens != self.config.grid_size**2:
            raise ValueError(f"plan {plan.name!r} pools or spreads visual tokens over the patch grid, but they include the CLS "
                             "token (vision_feature_select_strategy=full); use vision_feature_select_strategy=default")
        for i in plan.xattn_layers:
            if str(i) not in self.xattn:
                block = GatedCrossAttention(self.text_config)
                self.xattn[str(i)] = block.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        self.plan = plan

    def _init_new_weights(self, std: float) -> None:
        for m in [self.lm_head, self.multi_modal_projector.linear_1, getattr(self.multi_modal_projector, "linear_2", None)]:
            if m is not None:
                with gathered(m.parameters()):
                    nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    # --- construction: the one place a model is made (from a config, a checkpoint or two backbones) --
    @classmethod
    def from_config(cls, config: MLLMConfig, plan: Plan | None = None, dtype: torch.dtype | None = None, init: bool = True) -> "MLLM":
        """A new model of `config`'s architecture in `dtype`; `init=False` skips random
        initialisation (weights are loaded next)."""
        previous = torch.get_default_dtype()
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            if init:
                return cls(config, plan)
            with no_init_weights():
                return cls(config, plan)
        finally:
            torch.set_default_dtype(previous)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "MLLM":
        """Load a llava-format directory (a llava-hf checkpoint or one of our exports, whose plan it
        restores). Names and shapes are checked against the safetensors headers before any tensor is
        read, so a checkpoint that does not fit fails at once, naming the first mismatches."""
        hf = checkpoint.read_config(path)
        if hf.get("model_type") != "llava":
            raise ValueError(
                f"{path}/config.json has model_type {hf.get('model_type')!r}, not 'llava'. For separate vision "
                "and language checkpoints set model.vision_pretrained and model.llm_pretrained instead."
            )
        plan_dict = hf.get("efficient_mllm", {}).get("plan")
        model = cls.from_config(MLLMConfig.from_hf(hf), Plan.from_dict(plan_dict) if plan_dict else None, dtype=dtype, init=False)
        shapes = checkpoint.read_shapes(path)
        if shapes is not None:
            message = checkpoint.mismatch_message(str(path), *checkpoint.mismatches(model, shapes))
            if message:
                raise ValueError(message)
        checkpoint.load_weights(model, checkpoint.read_state_dict(path), str(path))
        return model

    @classmethod
    def from_components(cls, config: MLLMConfig, vision_path=None, llm_path=None, dtype: torch.dtype | None = None) -> "MLLM":
        """`config`'s model with the vision tower and/or LLM taken from their own HF directories (their
        shapes replace the config's). The projector (and any part not given) starts randomly
        initialised: this is how LLaVA's stage-1 pretraining starts (CLIP + Vicuna + a new projector)."""
        from transformers import AutoConfig

        vision = llm = None
        if vision_path:
            vision = AutoConfig.from_pretrained(checkpoint.checkpoint_dir(vision_path, "model.vision_pretrained"))
            vision = getattr(vision, "vision_config", vision)  # a full CLIP/SigLIP dir holds text + vision
        if llm_path:
            llm = AutoConfig.from_pretrained(checkpoint.checkpoint_dir(llm_path, "model.llm_pretrained"))
        model = cls.from_config(config.with_backbones(vision, llm), dtype=dtype)
        if vision_path:
            sd = checkpoint.read_state_dict(vision_path)
            sd = {k.split("vision_model.", 1)[1]: v for k, v in sd.items() if "vision_model." in k} or sd
            _load_part(model.vision_tower, sd, str(vision_path))
        if llm_path:
            sd = checkpoint.read_state_dict(llm_path)
            _load_part(model.language_model, {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}, str(llm_path))
            head = sd.get("lm_head.weight")
            if head is not None and model.lm_head.weight is not model.language_model.embed_tokens.weight:
                load_state_dict(model.lm_head, {"weight": head})
        return model

    def save_pretrained(self, path, max_shard_size: str = "5GB", state_dict: dict | None = None) -> Path:
        """A llava-format directory (safetensors, llava-hf names, our plan in config.json) that
        `MLLM.from_pretrained` and `LlavaForConditionalGeneration.from_pretrained` load. `state_dict`
        replaces the model's own (e.g. LoRA merged into plain weights: models.lora)."""
        hf = self.config.to_hf_dict()
        hf["efficient_mllm"]["plan"] = self.plan.to_dict()
        hf["architectures"] = ["LlavaForConditionalGeneration"]
        hf["dtype"] = str(self.dtype).removeprefix("torch.")
        return checkpoint.write_checkpoint(path, checkpoint.hub_state_dict(self, state_dict), hf, max_shard_size)

    # --- what parameter sharding needs (train/infra/sharding.py) -----------------------------------
    def gathered_units(self) -> list[nn.Module]:
        """Modules whose weights must be whole around their forward and backward under ZeRO-3: the
        decoder layers, because the plan reads head and FFN slices of their weights directly."""
        return list(self.language_model.layers)

    def shard_units(self) -> list[nn.Module]:
        """FSDP units below the root: each vision encoder layer and each decoder layer (embeddings,
        LM head and projector stay in the root unit)."""
        return [*self.vision_tower.encoder.layers, *self.language_model.layers]

    # --- pieces ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """Projected visual tokens `[n_images, n_v, d]` and, for a pre-LLM step, a keep mask
        `[n_images, n_v]` (None without one): pruning keeps tokens in place, pooling puts the
        pooled tokens in the first slots. A frozen tower runs without autograd."""
        pre = self.plan.pre_llm
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            if pre is not None and pre.method == "dominant":
                features, cls, dominance = features_and_dominance(self.vision_tower, pixel_values, self.config)
            else:
                features, cls = image_features(self.vision_tower, pixel_values, self.config)
        tokens, keep = self.multi_modal_projector(features), None
        if pre is not None and pre.method == "cls_knee":
            keep = cls_knee_keep(features, cls, pre.min_keep)
        elif pre is not None and pre.method == "dominant":
            keep = top_keep(dominance, pre.tokens(features.shape[1]))
        elif pre is not None and pre.method == "pool":
            tokens, keep = pool_tokens(tokens, self.config.grid_size, pre.kernel)
        return tokens, keep

    def _rope(self, h: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return self.language_model.rotary_emb(h, pos)

    def embed_inputs(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None) -> tuple[Layout, Stream, Stream]:
        """What the decoder consumes: where each token sits in the sequence (`Layout`), the text stream
        (token embeddings) and the visual stream (projected patch features, after pre-LLM pruning)."""
        layout = Layout.from_inputs(input_ids, attention_mask, self.config.image_token_id)
        text_ids = torch.gather(input_ids, 1, layout.text_index)
        text_h = self.language_model.embed_tokens(text_ids)
        text_pos = torch.gather(layout.positions, 1, layout.text_index)
        text = Stream(text_h, text_pos, layout.text_valid, *self._rope(text_h, text_pos))
        vis = self._visual_stream(layout, pixel_values, text)
        return layout, text, vis

    def _visual_stream(self, layout: Layout, pixel_values: Tensor | None, text: Stream) -> Stream:
        n_tokens = layout.vis_valid.sum(1)
        n_v = self.config.num_image_tokens
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if int(n_tokens.sum()) != n_images * n_v or bool((n_tokens % n_v).any()):
            raise ImageTokenMismatch(
                f"<image> tokens per row {n_tokens.tolist()} do not match {n_images} image(s) x {n_v} visual "
                f"tokens per image: each image needs exactly {n_v} consecutive <image> tokens "
                f"(image_token_id={self.config.image_token_id}); tokenize prompts with data.chat.ChatTokenizer "
                "or the checkpoint's processor, which expand one <image> placeholder to that many"
            )
        if n_images == 0:
            return empty_like_visual(text)
        features, keep = self.encode_images(pixel_values)
        features = features.to(text.h.dtype)  # [N, n_v, d]
        b, v = layout.vis_valid.shape
        h = text.h.new_zeros(b, v, features.shape[-1])
        h[layout.vis_valid] = features.reshape(-1, features.shape[-1])
        pos = torch.gather(layout.positions, 1, layout.vis_index)
        slot = torch.arange(v, device=h.device).expand(b, v)
        vis = Stream(h, pos, layout.vis_valid, *self._rope(h, pos), patch=slot % n_v, image=slot // n_v, embed=h)
        if keep is not None:  # pre-LLM step: dropped tokens never enter the LLM
            kept = torch.zeros_like(layout.vis_valid)
            kept[layout.vis_valid] = keep.reshape(-1)
            count = kept.sum(1)
            index = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, : max(1, int(count.max()))]
            vis = vis.gather(index, torch.arange(index.shape[1], device=h.device)[None] < count[:, None])
        return vis

    # --- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        logits: str = "auto",
        use_cache: bool = False,
        query_pos: Tensor | None = None,
        layer_hook: LayerHook | None = None,
    ) -> MLLMOutput:
        """Prefill (or train) on a batch.

        `logits`: "all" -> `[B, L, vocab]` in sequence order; "last" -> `[B, vocab]` at each row's last
        valid token; "none"; "auto" = "none" when `labels` are given, else "all". The loss only
        evaluates the LM head on supervised positions. `query_pos` [B]: sequence position of the
        token whose attention scores visual tokens for token selection (default: each row's last
        valid token, i.e. the end of the prompt at inference). `layer_hook` observes (or replaces) each
        layer's output streams: how the calibration tools measure layers (models/calibration.py).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout, text, vis = self.embed_inputs(input_ids, attention_mask, pixel_values)
        text, vis, keys, cross = run_decoder(
            self.language_model,
            self.plan,
            text,
            vis,
            query_index(text, query_pos),
            self.config.grid_size,
            self.xattn,
            use_cache=use_cache,
            gradient_checkpointing=self.gradient_checkpointing and self.training,
            hook=layer_hook,
            image_keys=image_keys_for(self.plan, layout.vis_valid, pixel_values, self.config.num_image_tokens),
        )
        out = MLLMOutput()
        if labels is not None:
            out.loss, out.n_loss_tokens = self._loss(text, layout, labels)
        mode = ("none" if labels is not None else "all") if logits == "auto" else logits
        if mode == "all":
            out.logits = self._all_logits(text, vis, layout, input_ids.shape)
        elif mode == "last":
            out.logits = self.lm_logits(last_valid_hidden(text))
        if use_cache:
            out.cache = DecodeState(keys, attention_mask.long().sum(1), cross)
        return out

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, state: DecodeState) -> Tensor:
        """One decoding step: `token_ids` [B] -> next-token logits [B, vocab]; `state` is updated."""
        pos = state.next_pos[:, None]
        h = self.language_model.embed_tokens(token_ids[:, None])
        text = Stream(h, pos, torch.ones_like(pos, dtype=torch.bool), *self._rope(h, pos))
        idx = torch.zeros_like(token_ids)
        text, _, state.keys, state.xattn = run_decoder(
            self.language_model, self.plan, text, empty_like_visual(text), idx, self.config.grid_size, self.xattn, state=state
        )
        state.next_pos = state.next_pos + 1
        return self.lm_logits(text.h[:, 0])

    def lm_logits(self, h: Tensor) -> Tensor:
        """Next-token logits of final hidden states (final norm, then the LM head)."""
        return self.lm_head(self.language_model.norm(h))

    def _loss(self, text: Stream, layout: Layout, labels: Tensor) -> tuple[Tensor, int]:
        """Next-token cross-entropy on supervised positions only (the LM head runs on those rows)."""
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        after_image = torch.gather(targets, 1, layout.vis_index)[layout.vis_valid]
        if bool((after_image != -100).any()):
            raise ValueError(
                "a supervised label directly follows an <image> token; the prediction would come from a "
                "visual token. Mask that label with -100 (LLaVA puts a newline after <image>)."
            )
        text_targets = torch.gather(targets, 1, layout.text_index).masked_fill(~layout.text_valid, -100)
        sel = text_targets != -100
        n = int(sel.sum())
        if n == 0:
            return text.h.sum() * 0.0, 0
        logits = self.lm_logits(text.h[sel])
        return F.cross_entropy(logits.float(), text_targets[sel], reduction="mean"), n

    def _all_logits(self, text: Stream, vis: Stream, layout: Layout, shape) -> Tensor:
        b, length = shape
        logits = text.h.new_full((b, length, self.lm_head.out_features), float("nan"))
        _scatter_rows(logits, layout.text_index, layout.text_valid, self.lm_logits(text.h))
        if vis.n:  # surviving visual tokens; pruned ones stay NaN
            slot = vis.image * self.config.num_image_tokens + vis.patch
            _scatter_rows(logits, torch.gather(layout.vis_index, 1, slot), vis.valid, self.lm_logits(vis.h))
        return logits


def _scatter_rows(out: Tensor, index: Tensor, valid: Tensor, values: Tensor) -> None:
    rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(index)
    out[rows[valid], index[valid]] = values[valid].to(out.dtype)


def query_index(text: Stream, query_pos: Tensor | None) -> Tensor:
    """Text-stream index of each row's scoring token: at `query_pos`, or the last valid token."""
    if query_pos is None:
        return text.pos.masked_fill(~text.valid, -1).argmax(1)
    return ((text.pos == query_pos[:, None]) & text.valid).float().argmax(1)


def last_valid_hidden(text: Stream) -> Tensor:
    """Hidden state of each row's last valid text token (the one that predicts the next token)."""
    idx = query_index(text, None)
    return text.h[torch.arange(text.h.shape[0], device=idx.device), idx]


def _load_part(module: nn.Module, state: dict, source: str) -> None:
    missing, _ = load_state_dict(module, state)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} weights the model needs, e.g. {missing[:5]}")
