"""MLLM: vision tower -> projector -> causal LM decoder whose forward we own.

Weights and module names are HF's (the family's vision model and projector, `LlamaModel`/
`Qwen2Model`, `lm_head`), so transformers' checkpoints of every family load and our exports load
back into transformers (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`).
Each image is given as its placeholder tokens in `input_ids` (the HF processors' layout: one
`<image>` id per visual token); the model replaces them with the visual tokens its family encodes
(`models/family.py`), which also carry their place (image, tile, row, column) for the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.initialization import no_init_weights

from . import checkpoint, decoding, original_layout
from .blind_scores import image_keys_for
from .config import MLLMConfig
from .decoder import LayerHook, PlannedDecoderLayer, run_decoder
from .decoding import DecodeState
from .family import VisualTokens
from .gathered import gathered, hf_from_config, load_state_dict
from .host_sizes import BatchSizes, ImageTokenMismatch, image_rows
from .layer_kinds import check_layer_kinds, layer_kinds
from .moe import expert_load, is_moe, load_balancing_loss
from .packed_attention import BACKENDS
from .packed_positions import packed_positions
from .plan import Plan
from .pruning import apply_pre_llm, scores_needed, spread_steps
from .validation import ConfigError
from .routing import Routing, RouteStats, build_routers
from .selection import compact, frame_steps
from .streams import Layout, Place, RopeTable, Stream, empty_like_visual, images_per_row, sample_starts, visual_mask
from .xattn import GatedCrossAttention


@dataclass
class MLLMOutput:
    loss: Tensor | None = None  # mean next-token cross-entropy over the supervised tokens
    logits: Tensor | None = None  # [B, L, V] ("all"), [B, V] ("last") or None
    n_loss_tokens: int = 0
    loss_sum: Tensor | None = None  # the same summed (loss = loss_sum / n_loss_tokens): for callers that weigh
                                    # tokens across batches (train/module.py)
    cache: "DecodeState | None" = None
    route_aux_loss: Tensor | None = None  # routed plans: the routers' auxiliary loss, weighted by Route.aux (models/routing.py)
    route_stats: "dict[int, RouteStats] | None" = None  # routed plans: per routed layer, what its router did
    moe_aux_loss: Tensor | None = None  # MoE LLMs: the load-balancing loss over the routed tokens (models/moe.py), unweighted
    expert_load: Tensor | None = None  # MoE LLMs: [experts] share of the top-k assignments (1/experts each when balanced)


class MLLM(nn.Module):
    """`plan` decides what visual tokens cost in each decoder layer (dense by default)."""

    def __init__(self, config: MLLMConfig, plan: Plan | None = None):
        super().__init__()
        self.config = config
        self.family = config.model_family
        text_cfg = config.hf_text_config()
        self.text_config = text_cfg
        self.family.build(self)  # vision_tower, multi_modal_projector (+ the family's own, e.g. image_newline)
        self.language_model = hf_from_config(text_cfg)
        self.language_model.layers = nn.ModuleList(PlannedDecoderLayer(layer) for layer in self.language_model.layers)
        self.lm_head = nn.Linear(text_cfg.hidden_size, text_cfg.vocab_size, bias=False)
        self.xattn = nn.ModuleDict()
        self.routers = nn.ModuleDict()  # per routed layer (or one shared) router of `plan` (models/routing.py)
        self.gradient_checkpointing = False
        with gathered(self.lm_head.parameters()):
            nn.init.normal_(self.lm_head.weight, std=text_cfg.initializer_range)
        self.family.init_weights(self)
        if config.ties_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.plan = Plan.dense(text_cfg.num_hidden_layers)
        self.set_plan(plan or self.plan)

    def set_attention(self, backend: str) -> None:
        """The kernel of packed rows' causal attention (models/packed_attention.py): auto, sdpa or varlen."""
        if backend not in BACKENDS:
            raise ValueError(f"model.attention must be one of {BACKENDS}, got {backend!r}")
        for layer in self.language_model.layers:
            layer.attention = backend

    def set_plan(self, plan: Plan) -> None:
        """Switch the visual-compute plan (training-free plans can change at any time). Gated
        cross-attention blocks the plan needs are created zero-gated, i.e. as identities, and routers
        zero-initialised (every score 0: the gate at its initial value, ties to the earlier token)."""
        check_plan(plan, self.config)
        for i, (policy, layer) in enumerate(zip(plan.layers, self.language_model.layers)):
            if 0 < policy.visual_ffn < 1 and is_moe(layer.mlp):
                raise ValueError(f"plan {plan.name!r}: layer {i} is a mixture-of-experts FFN, where visual_ffn={policy.visual_ffn} "
                                 "(YOPO's fraction of FFN neurons) has no defined meaning; use visual_ffn=1 (all of the routed "
                                 "experts) or 0 (no FFN) there")
        for i in plan.xattn_layers:
            if str(i) not in self.xattn:
                block = GatedCrossAttention(self.text_config)
                self.xattn[str(i)] = block.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        for name, router in build_routers(plan, self.text_config.hidden_size, self.routers).items():
            self.routers[name] = router.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype)
        self.plan = plan

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Each decoder layer's kind (models/layer_kinds.py): full attention, or linear attention (Qwen3.5)."""
        return tuple(layer.kind for layer in self.language_model.layers)

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
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, vision_tower=None) -> "MLLM":
        """Load a directory of any family (written by transformers' `save_pretrained`, a Hub download
        or one of our exports, whose plan it restores), or of the original LLaVA layout, whose vision
        tower is the CLIP directory `vision_tower` (default: the one its config.json names; see
        models/original_layout.py). Names and shapes are checked against the safetensors headers
        before any tensor is read, so a checkpoint that does not fit fails at once, naming the first
        mismatches."""
        hf = original_layout.read_config(path, vision_tower)
        plan_dict = hf.get("efficient_mllm", {}).get("plan")
        config = MLLMConfig.from_hf(hf, checkpoint.read_preprocessor(path))
        model = cls.from_config(config, Plan.from_dict(plan_dict) if plan_dict else None, dtype=dtype, init=False)
        shapes = original_layout.read_shapes(path, vision_tower)
        if shapes is not None:
            message = checkpoint.mismatch_message(str(path), *checkpoint.mismatches(model, shapes))
            if message:
                raise ValueError(message)
        checkpoint.load_weights(model, original_layout.read_state_dict(path, vision_tower), str(path))
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
            vision = getattr(vision, "vision_config", vision)  # a whole model's dir (CLIP, InternVL, Qwen2-VL) holds more
        if llm_path:
            llm = AutoConfig.from_pretrained(checkpoint.checkpoint_dir(llm_path, "model.llm_pretrained"))
        try:
            combined = config.with_backbones(vision, llm)
        except ConfigError as e:
            given = ", ".join(f"{k}={v}" for k, v in (("model.vision_pretrained", vision_path), ("model.llm_pretrained", llm_path)) if v)
            raise ConfigError(f"{given}: {e}") from None
        model = cls.from_config(combined, dtype=dtype)
        if vision_path:
            _load_part(model.vision_tower, tower_part(model.family, checkpoint.read_state_dict(vision_path)), str(vision_path))
        if llm_path:
            sd = checkpoint.read_state_dict(llm_path)
            _load_part(model.language_model, {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}, str(llm_path))
            head = sd.get("lm_head.weight")
            if head is not None and model.lm_head.weight is not model.language_model.embed_tokens.weight:
                load_state_dict(model.lm_head, {"weight": head})
        return model

    def save_pretrained(self, path, max_shard_size: str = "5GB", state_dict: dict | None = None) -> Path:
        """A directory of the family's format (safetensors, Hub weight names, our plan in config.json)
        that `MLLM.from_pretrained` and transformers' class of the family (e.g.
        `LlavaForConditionalGeneration`) load; a family no transformers class reads (MobileVLM) writes the
        original LLaVA layout, its tower's CLIP directory inside (models/original_layout.py). `state_dict` replaces the model's own (e.g. LoRA
        merged into plain weights: models.lora)."""
        hf = self.config.to_hf_dict()
        hf["efficient_mllm"]["plan"] = self.plan.to_dict()
        hf["architectures"] = [self.family.hf_architecture]
        hf["dtype"] = str(self.dtype).removeprefix("torch.")
        write = original_layout.write_checkpoint if self.family.original_layout else checkpoint.write_checkpoint
        return write(path, checkpoint.hub_state_dict(self, state_dict), hf, max_shard_size)

    @property
    def plan_modules(self) -> list[str]:
        """The plan's own modules this model holds (gated blocks, routers): the family's transformers class
        has none of them, so it would load an export without them and not run the plan."""
        return [name for name in ("xattn", "routers") if len(getattr(self, name))]

    # --- what parameter sharding needs (train/infra/sharding.py) -----------------------------------
    def gathered_units(self) -> list[nn.Module]:
        """Modules whose weights must be whole around their forward and backward under ZeRO-3: the
        decoder layers, because the plan reads head and FFN slices of their weights directly."""
        return list(self.language_model.layers)

    def shard_units(self) -> list[nn.Module]:
        """FSDP units below the root: each vision encoder layer and each decoder layer (embeddings,
        LM head and projector stay in the root unit)."""
        return [*self.family.vision_layers(self), *self.language_model.layers]

    # --- pieces ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, pixel_values: Tensor, image_sizes: Tensor | None = None,
                      sizes: list[tuple[int, ...]] | None = None) -> VisualTokens:
        """The visual tokens of every image (`models.family.VisualTokens`: one entry per placeholder,
        with its place), after the plan's pre-LLM step: pruning keeps tokens in their slots, pooling
        writes the pooled tokens into the first slots of each image. `sizes`: the rows of `image_sizes`
        as the host knows them (`BatchSizes.item_sizes`)."""
        pre = self.plan.pre_llm
        if pre is not None and pre.method == "frames" and self.family.video_token is not None:  # the tower never sees the others
            steps = [frame_steps(int(t), pre.keep) for t in image_sizes[:, 0].tolist()]
            pixels, taken = self.family.take_steps(self.config, pixel_values, image_sizes, steps)
            places = torch.cat([self.family.image_places(self.config, tuple(g)) for g in image_sizes.tolist()]).to(pixel_values.device)
            counts = torch.tensor([self.config.tokens_per_image(tuple(g)) for g in image_sizes.tolist()], device=pixel_values.device)
            return spread_steps(self.family.encode(self, pixels, taken).h, places, counts, steps)
        return apply_pre_llm(self.family.encode(self, pixel_values, image_sizes, scores_needed(pre), sizes=sizes), pre)

    def tower_grad(self):
        """Autograd context for the vision tower: off when the tower is frozen (stage=pretrain /
        finetune), so it keeps no activations; the projector after it still trains."""
        trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        return torch.set_grad_enabled(torch.is_grad_enabled() and trainable)

    def rope(self, h: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE tables [B, N, head_dim] of `positions` (the family's position ids)."""
        return self.language_model.rotary_emb(h, positions)

    def rope_table(self, like: Stream, length: int) -> RopeTable:
        """RoPE tables of positions 0..length-1 (what renumbering selections gather from)."""
        positions = torch.arange(length, device=like.h.device)[None]
        return RopeTable(*self.rope(like.h[:1, :1].expand(1, length, -1), positions))

    def embed_inputs(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                     image_sizes: Tensor | None = None, positions: Tensor | None = None,
                     sample_index: Tensor | None = None, step_seconds: Tensor | None = None,
                     sizes: BatchSizes | None = None) -> tuple[Layout, Stream, Stream]:
        """What the decoder consumes: where each token sits in the sequence (`Layout`), the text stream
        (token embeddings) and the visual stream (the family's visual tokens, after pre-LLM steps);
        `positions`: the prompt's RoPE position ids (default: `prompt_positions`); `sample_index` [B, L]:
        packed rows' samples (positions then restart at each sample); `sizes`: the batch's sizes as the
        host knows them (default: read from the inputs, `batch_sizes`)."""
        image_sizes = self.image_sizes_of(input_ids, attention_mask, pixel_values, image_sizes)
        sizes = sizes or self.batch_sizes(input_ids, attention_mask, pixel_values, image_sizes)
        layout = Layout.from_inputs(input_ids, attention_mask, self.config.visual_token_ids, sample_index,
                                    (sizes.text_width, sizes.visual_width))
        if positions is None:
            positions = self.prompt_positions(input_ids, attention_mask, image_sizes, sample_index, step_seconds)
        text_ids = torch.gather(input_ids, 1, layout.text_index)
        text_h = self.language_model.embed_tokens(text_ids)
        text = Stream(text_h, torch.gather(layout.order, 1, layout.text_index), layout.text_valid,
                      *self.rope(text_h, take_positions(positions, layout.text_index)),
                      start=None if layout.start is None else torch.gather(layout.start, 1, layout.text_index))
        vis = self._visual_stream(layout, positions, pixel_values, image_sizes, text, sizes)
        return layout, text, vis

    def batch_sizes(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None = None,
                    image_sizes: Tensor | None = None, labels: Tensor | None = None, sample_index: Tensor | None = None,
                    step_seconds: Tensor | None = None) -> BatchSizes:
        """The sizes of a batch (models/host_sizes.py) from its inputs: free on CPU tensors (a collator's,
        before they move to the device), one read back otherwise. Give them to `forward` as `sizes`.
        M-RoPE families' positions come along: their rule walks each row's items on the host."""
        image_sizes = self.image_sizes_of(input_ids, attention_mask, pixel_values, image_sizes)
        positions = None
        if self.family.mrope:
            positions = self.prompt_positions(input_ids, attention_mask, image_sizes, sample_index, step_seconds)
        return BatchSizes.of(self.config, input_ids, attention_mask, self.family.image_count(pixel_values, image_sizes), image_sizes,
                             labels, sample_index, positions)

    def image_sizes_of(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor | None,
                       image_sizes: Tensor | None) -> Tensor | None:
        """`image_sizes` as given, or, for a batch given without them, what the family reads from the
        prompt's placeholder runs (`Family.sizes_from_prompt`: InternVL's tile counts)."""
        if image_sizes is not None or pixel_values is None:
            return image_sizes
        return self.family.sizes_from_prompt(self.config, input_ids, attention_mask, pixel_values)

    def prompt_positions(self, input_ids: Tensor, attention_mask: Tensor, image_sizes: Tensor | None = None,
                         sample_index: Tensor | None = None, step_seconds: Tensor | None = None) -> Tensor:
        """RoPE position ids of a batch of prompts, by the family's rule (`Family.rope_positions`):
        [B, L], or [3, B, L] for M-RoPE; packed rows (`sample_index`): each sample's as if it were alone.
        `image_sizes` / `step_seconds`: the visual items in prompt order (models/video.py)."""
        def rule(ids: Tensor, mask: Tensor) -> Tensor:
            is_image = visual_mask(ids, mask, self.config.visual_token_ids)
            return self.family.rope_positions(self.config, mask, is_image, image_sizes, step_seconds)

        if sample_index is None:
            return rule(input_ids, attention_mask)
        order = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return packed_positions(rule, input_ids, attention_mask, order, sample_starts(order, sample_index.to(order.device)))

    def _visual_stream(self, layout: Layout, positions: Tensor, pixel_values: Tensor | None, image_sizes: Tensor | None,
                       text: Stream, sizes: BatchSizes) -> Stream:
        if not sizes.image_rows:
            if sizes.visual_width:
                raise ImageTokenMismatch(
                    f"the prompts hold {list(sizes.visual_per_row)} <image> tokens per row (image_token_id={self.config.image_token_id}) "
                    "but no images were given"
                )
            return empty_like_visual(text)
        tokens = self.encode_images(pixel_values, image_sizes, None if sizes.item_sizes is None else list(sizes.item_sizes))
        b, v = layout.vis_valid.shape
        slots = torch.nonzero_static(layout.vis_valid.flatten(), size=len(tokens.h)).flatten()  # the tokens' slots, in order

        def laid(x: Tensor) -> Tensor:
            """Per-token values [T, ...] in their visual slots [B, V, ...] (zeros in the padding)."""
            return x.new_zeros(b * v, *x.shape[1:]).index_copy(0, slots, x).view(b, v, *x.shape[1:])

        h = laid(tokens.h.to(text.h.dtype))
        place = laid(tokens.place)
        place[..., Place.SLOT] = torch.arange(v, device=h.device)
        image, row = tokens.image_of_token, slots // v
        first = torch.full((b,), len(tokens.counts), device=h.device).scatter_reduce(0, row, image, "amin")  # each row's first image
        place[..., Place.IMAGE] = laid(image - first[row])
        rope_pos = take_positions(positions, layout.vis_index)
        start = None if layout.start is None else torch.gather(layout.start, 1, layout.vis_index)
        inject = None if tokens.inject is None else laid(tokens.inject.to(h.dtype))  # DeepStack: features for the first layers
        vis = Stream(h, torch.gather(layout.order, 1, layout.vis_index), layout.vis_valid, *self.rope(h, rope_pos), place=place, embed=h,
                     start=start, inject=inject)
        if tokens.keep is not None:  # pre-LLM step: dropped tokens never enter the LLM
            kept = laid(tokens.keep)
            counts = sizes.visual_counts(self.plan.pre_llm)
            vis = vis.gather(*compact(kept, None if counts is None else counts.width))
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
        image_sizes: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        mm_token_type_ids: Tensor | None = None,
        sample_index: Tensor | None = None,
        step_seconds: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | None = None,
        sizes: BatchSizes | None = None,
    ) -> MLLMOutput:
        """Prefill (or train) on a batch: the family's own inputs (`input_ids` with each image's
        placeholder tokens, `attention_mask`, `pixel_values`, and for tiling families `image_sizes`
        [n_images, 2]), so rows with different images, and different token counts, share a batch.
        InternVL's may come without sizes, as transformers' forward takes them: each image's tile
        count then follows from its run of placeholders (`Family.sizes_from_prompt`).

        `logits`: "all" -> `[B, L, vocab]` in sequence order; "last" -> `[B, vocab]` at each row's last
        valid token; "none"; "auto" = "none" when `labels` are given, else "all". The loss only
        evaluates the LM head on supervised positions. `query_pos` [B]: sequence order of the
        token whose attention scores visual tokens for token selection (default: each row's last
        valid token, i.e. the end of the prompt at inference). `layer_hook` observes (or replaces) each
        layer's output streams: how the calibration tools measure layers (models/calibration.py).
        Qwen's inputs are accepted under transformers' names: `image_grid_thw` (our `image_sizes` for
        that family) and `mm_token_type_ids`, which must agree with the placeholders in `input_ids`;
        videos as `pixel_values_videos`, `video_grid_thw` and (Qwen2.5-VL) `second_per_grid_ts`, or,
        as the data path gives them, among the images in prompt order (`pixel_values`, `image_sizes`
        with t > 1) with `step_seconds` [n_items], each item's seconds per temporal step (models/video.py).
        `sample_index` [B, L]: rows packed with several samples each (data/packing.py): the sample of its
        row each token belongs to. Every sample is then computed as if it were alone: attention, token
        scoring and selection stay inside it, its positions restart, its loss never predicts across.
        `sizes`: the batch's sizes as the host knows them (`batch_sizes` on the CPU batch, models/host_sizes.py):
        with them prefill and training read nothing back from the device; without, they are read once.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_grid_thw is not None:
            if image_sizes is not None:
                raise ValueError("give image_grid_thw (transformers' name) or image_sizes, not both")
            image_sizes = image_grid_thw
        image_sizes = self.image_sizes_of(input_ids, attention_mask, pixel_values, image_sizes)
        if mm_token_type_ids is not None:
            check_token_types(mm_token_type_ids, input_ids, attention_mask, self.config.visual_token_ids)
        if pixel_values_videos is not None:
            if step_seconds is not None:
                raise ValueError("give videos as pixel_values_videos (transformers' inputs) or among the images with "
                                 "step_seconds, not both")
            items = self.family.visual_items(self.config, input_ids, attention_mask, pixel_values, image_sizes,
                                             (pixel_values_videos, video_grid_thw, second_per_grid_ts))
            pixel_values, image_sizes, step_seconds = items if items is not None else (None, None, None)
        if sample_index is not None:
            self._check_packable(use_cache, query_pos)
        if sizes is None or (labels is not None and sizes.supervised is None):
            sizes = self.batch_sizes(input_ids, attention_mask, pixel_values, image_sizes, labels, sample_index, step_seconds)
        if sizes.positions is not None:
            positions = sizes.positions.to(input_ids.device, non_blocking=True)
        else:
            positions = self.prompt_positions(input_ids, attention_mask, image_sizes, sample_index, step_seconds)
        layout, text, vis = self.embed_inputs(input_ids, attention_mask, pixel_values, image_sizes, positions, sample_index,
                                              sizes=sizes)
        routing = self.routing()
        decoded = run_decoder(
            self.language_model,
            self.plan,
            text,
            vis,
            query_index(text, query_pos) if layout.sample is None else sample_query_index(text, layout),
            self.xattn,
            use_cache=use_cache,
            gradient_checkpointing=self.gradient_checkpointing and self.training,
            hook=layer_hook,
            image_keys=image_keys_for(self.plan, self.family.image_pixels(self.config, pixel_values, image_sizes)
                                      if self.plan.draws_random else None, images_per_row(vis)),
            rope=self.rope_table(text, input_ids.shape[1]) if self.plan.renumbers else None,
            routing=routing,
            counts=sizes.visual_counts(self.plan.pre_llm),
        )
        text, vis = decoded.text, decoded.vis
        out = MLLMOutput()
        if decoded.router:  # MoE LLM
            out.moe_aux_loss, out.expert_load = self.moe_routing(decoded.router)
        if routing is not None:
            out.route_aux_loss, out.route_stats = routing.aux_loss, routing.stats
        if labels is not None:
            out.loss_sum, out.n_loss_tokens = self._loss(text, layout, labels, sizes.supervised)
            out.loss = out.loss_sum / max(out.n_loss_tokens, 1)
        mode = ("none" if labels is not None else "all") if logits == "auto" else logits
        if mode == "all":
            out.logits = self._all_logits(text, vis, layout, input_ids.shape)
        elif mode == "last":
            out.logits = self.lm_logits(last_valid_hidden(text))
        if use_cache:
            n = attention_mask.long().sum(1)
            out.cache = DecodeState(decoded.keys, n, next_positions(positions, attention_mask), decoded.cross, decoded.rope_shift)
        return out


    def routing(self) -> Routing | None:
        """What `run_decoder` needs to run this model's routed layers in one forward (None: no routing)."""
        return Routing(self.plan, self.routers, self.text_config.rms_norm_eps) if self.plan.routers else None

    def _check_packable(self, use_cache: bool, query_pos: Tensor | None) -> None:
        if use_cache or query_pos is not None:
            raise ValueError("packed rows (sample_index) are for training and prefill: decoding and query_pos work on "
                             "one sample per row; give unpacked rows")

    @torch.no_grad()
    def decode_step(self, token_ids: Tensor, state: DecodeState) -> Tensor:
        """One decoding step: `token_ids` [B] -> next-token logits [B, vocab]; `state` is updated
        (fixed shapes once `models.decoding.reserve` made room for the tokens to come: models/decoding.py)."""
        return decoding.decode_step(self, token_ids, state)

    def moe_routing(self, router: list) -> tuple[Tensor | None, Tensor | None]:
        """An MoE LLM's load-balancing loss (unweighted; training adds it times `router_aux_loss_coef`) and
        each expert's share of the assignments, over the tokens each MoE layer's FFN processed under the
        plan (models/moe.py)."""
        t = self.text_config
        return (load_balancing_loss(router, t.num_experts, t.num_experts_per_tok),
                expert_load(router, t.num_experts, t.num_experts_per_tok).detach())

    def lm_logits(self, h: Tensor) -> Tensor:
        """Next-token logits of final hidden states (final norm, then the LM head)."""
        return self.lm_head(self.language_model.norm(h))

    def _loss(self, text: Stream, layout: Layout, labels: Tensor, n: int) -> tuple[Tensor, int]:
        """Summed next-token cross-entropy on supervised positions only (the LM head runs on those rows), and
        their count `n` (the host's: `BatchSizes.supervised`, which also checked that none follows an image)."""
        if n == 0:
            return text.h.sum() * 0.0, 0
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        if layout.start is not None:  # packed rows: a sample's last token predicts nothing of the next sample
            targets[:, :-1] = targets[:, :-1].masked_fill(layout.start[:, 1:] != layout.start[:, :-1], -100)
        text_targets = torch.gather(targets, 1, layout.text_index).masked_fill(~layout.text_valid, -100).flatten()
        rows = torch.nonzero_static(text_targets != -100, size=n).flatten()  # (a fixed size: no read back)
        logits = self.lm_logits(text.h.flatten(0, 1).index_select(0, rows))
        return F.cross_entropy(logits.float(), text_targets.index_select(0, rows), reduction="sum"), n

    def _all_logits(self, text: Stream, vis: Stream, layout: Layout, shape) -> Tensor:
        b, length = shape
        logits = text.h.new_full((b, length, self.lm_head.out_features), float("nan"))
        _scatter_rows(logits, layout.text_index, layout.text_valid, self.lm_logits(text.h))
        if vis.n:  # surviving visual tokens; pruned ones stay NaN
            _scatter_rows(logits, torch.gather(layout.vis_index, 1, vis.at(Place.SLOT)), vis.valid, self.lm_logits(vis.h))
        return logits


def check_plan(plan: Plan, config: MLLMConfig) -> None:
    """Raise ConfigError when `plan` cannot run on a model of `config` (its depth, heads, positions, tower);
    the job calls it when it resolves the plan, before any data work, and `MLLM.set_plan` again."""
    text, family = config.hf_text_config(), config.model_family
    if len(plan.layers) != text.num_hidden_layers:
        raise ConfigError(f"plan {plan.name!r} has {len(plan.layers)} layers but the LLM has {text.num_hidden_layers}")
    plan.validate(text.num_attention_heads)
    check_layer_kinds(plan, layer_kinds(text))  # e.g. no attention scores from a linear-attention layer
    if plan.renumbers and not family.renumbers_positions:
        raise ConfigError(f"plan {plan.name!r} renumbers RoPE positions (select.positions=renumber, e.g. "
                          f"arch.methods.pdrop.positions=renumber), which has no meaning for the {family.name} family's "
                          "positions (not ranks); use positions=keep, what arch=pdrop does on this family by default")
    if plan.pre_llm is not None and plan.pre_llm.method == "cls_knee" and not config.has_cls:
        raise ConfigError(f"plan {plan.name!r} prunes by CLS similarity, but the {config.vision_family} tower has no CLS token")
    if plan.needs_patch_grid and config.has_cls and config.vision_feature_select_strategy == "full":
        raise ConfigError(f"plan {plan.name!r} pools or spreads visual tokens over the patch grid, but they include the CLS "
                          "token (vision_feature_select_strategy=full); use vision_feature_select_strategy=default")


def check_token_types(mm_token_type_ids: Tensor, input_ids: Tensor, attention_mask: Tensor, visual_token_ids: tuple[int, ...]) -> None:
    """transformers' `mm_token_type_ids` (0 text, 1 image, 2 video) must mark exactly the image and
    video placeholders of `input_ids`: positions are computed from the placeholders themselves."""
    valid = attention_mask.bool()
    for kind, (name, token_id) in enumerate(zip(("image", "video"), visual_token_ids), start=1):
        if not torch.equal((mm_token_type_ids == kind) & valid, (input_ids == token_id) & valid):
            raise ValueError(f"mm_token_type_ids marks other tokens as {name} ({kind}) than the {name} placeholders of "
                             f"input_ids (id {token_id}); build both from the same prompt")
    if len(visual_token_ids) < 2 and bool((mm_token_type_ids[valid] == 2).any()):
        raise ValueError("mm_token_type_ids marks video tokens (2): this family takes no video, only images")


def take_positions(positions: Tensor, index: Tensor) -> Tensor:
    """The position ids ([B, L] or M-RoPE's [3, B, L]) of the tokens `index` [B, N]: every plan
    operation moves a token's positions with it, so a kept token keeps its (t, h, w) triple."""
    return torch.gather(positions, -1, index.expand(*positions.shape[:-2], *index.shape))


def next_positions(positions: Tensor, attention_mask: Tensor) -> Tensor:
    """[B] the RoPE position of each row's first generated token: one past its largest prompt position
    (the prompt length for 1-D positions; for M-RoPE the length plus the row's rope delta, which is
    negative after images). Our own counter, never read back from cached model state."""
    masked = positions.masked_fill(~attention_mask.bool(), -1)
    return masked.reshape(-1, *attention_mask.shape).amax(dim=(0, 2)) + 1


def _scatter_rows(out: Tensor, index: Tensor, valid: Tensor, values: Tensor) -> None:
    rows = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(index)
    out[rows[valid], index[valid]] = values[valid].to(out.dtype)


def query_index(text: Stream, query_pos: Tensor | None) -> Tensor:
    """Text-stream index of each row's scoring token: at `query_pos`, or the last valid token."""
    if query_pos is None:
        return text.order.masked_fill(~text.valid, -1).argmax(1)
    return ((text.order == query_pos[:, None]) & text.valid).float().argmax(1)


def sample_query_index(text: Stream, layout: Layout) -> Tensor:
    """[B, S] text-stream index of each packed sample's last valid text token: each sample scores its
    own visual tokens, as it would alone (rows with fewer samples repeat an index of their first)."""
    sample = torch.gather(layout.sample.to(text.order.device), 1, layout.text_index)  # [B, T]
    n = int(layout.sample.max()) + 1
    own = (sample[:, :, None] == torch.arange(n, device=sample.device)) & text.valid[:, :, None]  # [B, T, S]
    return torch.where(own, text.order[:, :, None], -1).argmax(1)


def last_valid_hidden(text: Stream) -> Tensor:
    """Hidden state of each row's last valid text token (the one that predicts the next token)."""
    idx = query_index(text, None)
    return text.h[torch.arange(text.h.shape[0], device=idx.device), idx]


def images_of_rows(tokens_per_row: Tensor, tokens_per_image: Tensor, image_token_id: int) -> Tensor:
    """The prompt row [n_images] each image belongs to (`models.host_sizes.image_rows`, read back from tensors)."""
    rows = image_rows(tokens_per_row.tolist(), tokens_per_image.tolist(), image_token_id)
    return torch.tensor(rows, dtype=torch.long, device=tokens_per_image.device)


def tower_part(family, state: dict) -> dict:
    """The vision tower's tensors of a checkpoint under the tower's own names: a whole model of the family
    (InternVL's `vision_tower.*`, Qwen2-VL's `visual.*` without its merger, llava-hf's), else a tower's own
    directory (CLIP's `vision_model.*`, or bare names as InternVLVisionModel / Qwen's tower write them)."""
    internal = {family.to_internal_name(k): v for k, v in state.items()}
    tower = {k[len("vision_tower."):]: v for k, v in internal.items() if k.startswith("vision_tower.")}
    return tower or original_layout.tower_weights(state)


def _load_part(module: nn.Module, state: dict, source: str) -> None:
    missing, _ = load_state_dict(module, state)
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} weights the model needs, e.g. {missing[:5]}")
