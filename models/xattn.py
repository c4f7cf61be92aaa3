"""Gated cross-attention block (Flamingo / Mllama style) inserted before selected decoder layers.

Text tokens read the projected visual tokens through new parameters; `tanh` gates start at zero,
so inserting blocks into a pretrained LLM leaves it unchanged until training opens them. Queries
and keys get a per-head RMSNorm (Mllama); no RoPE on this path. Visual K/V are computed once per
image at prefill and cached for decoding. The block's MLP is the decoder family's own (Llama's
reads `mlp_bias`, which Qwen2 configs lack).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2MLP as Qwen25VLMLP
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2MLP as Qwen2VLMLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5MLP
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeMLP
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeMLP
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextMLP
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextMLP

from .gathered import gathered
from .attention import Keys, attend, merge_heads, split_heads


# text config model_type -> its decoder layers' (dense) MLP; MoE LLMs' blocks get the dense MLP of
# `intermediate_size` that their dense layers use (Qwen3.5-MoE has none: its shared expert's width)
MLPS = {"llama": LlamaMLP, "qwen2": Qwen2MLP, "qwen2_vl_text": Qwen2VLMLP, "qwen2_5_vl_text": Qwen25VLMLP, "qwen3": Qwen3MLP,
        "qwen3_moe": Qwen3MoeMLP, "qwen3_vl_text": Qwen3VLTextMLP, "qwen3_vl_moe_text": Qwen3VLMoeTextMLP,
        "qwen3_5_text": lambda c: Qwen3_5MLP(c, c.intermediate_size),
        "qwen3_5_moe_text": lambda c: Qwen3_5MoeMLP(c, c.shared_expert_intermediate_size)}


def family_mlp(config: PretrainedConfig) -> nn.Module:
    if config.model_type not in MLPS:
        raise ValueError(f"gated cross-attention has no MLP for {config.model_type!r} decoders (known: {sorted(MLPS)})")
    return MLPS[config.model_type](config)


class GatedCrossAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        d = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.input_layernorm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.mlp = family_mlp(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        std = config.initializer_range
        linears = (self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj)
        with gathered([lin.weight for lin in linears]):
            for lin in linears:
                nn.init.normal_(lin.weight, std=std)

    def visual_keys(self, embeds: Tensor, order: Tensor, valid: Tensor) -> Keys:
        """K/V of the projected visual tokens (computed once per image)."""
        k = self.k_norm(split_heads(self.k_proj(embeds), self.head_dim))
        v = split_heads(self.v_proj(embeds), self.head_dim)
        return Keys(k, v, order, valid, torch.ones_like(valid))

    def forward(self, h: Tensor, order: Tensor, keys: Keys, start: Tensor | None = None) -> Tensor:
        """Text hidden states `h` [B, T, d] at sequence orders `order` read the visual `keys` before them
        (in packed rows only those of their own sample, which starts at order `start` [B, T])."""
        q = self.q_norm(split_heads(self.q_proj(self.input_layernorm(h)), self.head_dim))
        allowed = keys.valid[:, None, :] & (keys.order[:, None, :] < order[:, :, None])  # [B, T, S]
        if start is not None:
            allowed = allowed & (keys.order[:, None, :] >= start[:, :, None])
        sees = allowed.any(-1, keepdim=True)  # rows before the image (or without one) get nothing
        mask = (allowed | ~sees)[:, None]
        out = merge_heads(attend(q, keys, mask, self.head_dim**-0.5)) * sees
        h = h + self.attn_gate.tanh() * self.o_proj(out)
        return h + self.mlp_gate.tanh() * self.mlp(self.post_attention_layernorm(h)) * sees
