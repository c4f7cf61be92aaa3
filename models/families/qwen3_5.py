"""Qwen3.5 and Qwen3.6 (dense and MoE; transformers' `qwen3_5` and `qwen3_5_moe`, which Qwen3.6 loads
as too): Qwen3-VL's tower, placeholders and positions without DeepStack, into a hybrid LLM.

* The tower (`Qwen3_5VisionModel`) is Qwen3-VL's (16 px patches, a learned square position table
  interpolated per grid, 2 x 2 merge into one LLM token per 32 x 32 pixels) with no DeepStack mergers;
  its `merger` is our projector. Placeholders, `mm_token_type_ids` and images' M-RoPE ids
  (`get_rope_index`, interleaved sections) are Qwen3-VL's, so this family only names other classes.
* The LLM declares a kind per layer (`layer_types`: three `linear_attention` layers, then one
  `full_attention` layer, repeated). Full-attention layers are gated attention (`q_proj` writes each
  head's query and a sigmoid output gate; q/k norms; rotary on the first quarter of each head,
  `partial_rotary_factor` 0.25), run by models/decoder.py; linear-attention layers are Gated DeltaNet
  (a causal depthwise conv, then the gated delta rule's recurrent state), run by
  models/linear_attention.py, where removing tokens is the only honest skip and plans are checked
  against what each kind can do (models/layer_kinds.py). RMSNorms are zero-centred (`1 + w`), which
  transformers' modules do themselves.
* The MoE variant routes each token to `num_experts_per_tok` of `num_experts` experts plus one shared
  expert behind a sigmoid gate (models/moe.py), in every layer.

Checkpoints are `Qwen3_5ForConditionalGeneration`'s / `Qwen3_5MoeForConditionalGeneration`'s
(`model.visual.*`, `model.language_model.*`, `lm_head.*`); the releases' multi-token-prediction head
(`mtp.*`) is not used, as transformers drops it too.
"""

from __future__ import annotations

from transformers import Qwen3_5Config, Qwen3_5MoeConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel

from ..config import MLLMConfig
from ..family import register
from ..validation import ConfigError
from .qwen3_vl import Qwen3VLFamily

GATED_NORM_ACTIVATIONS = ("silu", "swish", "sigmoid")  # the conv's activation (hidden_act) transformers' gated norm pairs with


@register
class Qwen3_5Family(Qwen3VLFamily):
    name = "qwen3_5"
    hf_model_type = "qwen3_5"
    hf_architecture = "Qwen3_5ForConditionalGeneration"
    vision_types = {"qwen3_5_vision": "qwen3_5"}
    text_types = {"qwen3_5_text": "qwen3_5"}
    hf_config_class = Qwen3_5Config
    tower_class = Qwen3_5VisionModel

    def validate(self, config: MLLMConfig) -> None:
        super().validate(config)
        text = config.hf_text_config()
        if text.hidden_act not in GATED_NORM_ACTIVATIONS:
            raise ConfigError(f"model.text.hidden_act={text.hidden_act!r}: Qwen3.5's linear-attention layers take one of "
                              f"{list(GATED_NORM_ACTIVATIONS)} (silu in the releases)")
        if text.linear_num_value_heads % text.linear_num_key_heads:
            raise ConfigError(f"model.text.linear_num_value_heads={text.linear_num_value_heads} must be a multiple of "
                              f"linear_num_key_heads={text.linear_num_key_heads} (each key head serves a group of value heads)")

    def dropped_on_load(self, key: str) -> bool:
        """The releases' multi-token-prediction head (`mtp.*`), which transformers ignores as well."""
        return key.startswith("mtp.")


@register
class Qwen3_5MoeFamily(Qwen3_5Family):
    name = "qwen3_5_moe"
    hf_model_type = "qwen3_5_moe"
    hf_architecture = "Qwen3_5MoeForConditionalGeneration"
    vision_types = {"qwen3_5_moe_vision": "qwen3_5"}
    text_types = {"qwen3_5_moe_text": "qwen3_5_moe"}
    hf_config_class = Qwen3_5MoeConfig
    tower_class = Qwen3_5MoeVisionModel
