"""An independent MobileVLM V2, the test oracle for the `mobilevlm` family (no transformers class exists).

Written from the paper (arXiv 2402.03766, Sec. 3.2: point-wise layers, average pooling to 12 x 12, a
PEG with a skip connection) and from reading Meituan-AutoML/MobileVLM (`LDPNetV2Projector`: FeatureIRLayer,
TokenDownLayer((12, 12)), PosInjectLayer; `prepare_inputs_labels_for_multimodal` splices the projected
tokens into the LLM's input embeddings), not from the code under test: the pooling is explicit loops over
PyTorch's adaptive windows, the PEG nine shifted products, and the rest is transformers' own
`CLIPVisionModel` and `LlamaForCausalLM` read from the original-layout directory under its weight names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

GRID = 12


def adaptive_windows(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows: cell i averages [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def reference_ldpv2(features: torch.Tensor, w: dict[str, torch.Tensor], out: int = GRID) -> torch.Tensor:
    """features [N, g*g, c] (raster order) -> [N, out*out, d]; `w` holds the original layout's projector
    tensors without the `model.mm_projector.` prefix."""
    h = F.gelu(features @ w["mlp.mlp.0.weight"].T + w["mlp.mlp.0.bias"]) @ w["mlp.mlp.2.weight"].T + w["mlp.mlp.2.bias"]
    n, t, d = h.shape
    g = math.isqrt(t)
    grid = h.view(n, g, g, d)
    windows = adaptive_windows(g, out)
    pooled = torch.stack([torch.stack([grid[:, r0:r1, c0:c1].mean((1, 2)) for c0, c1 in windows], 1) for r0, r1 in windows], 1)
    padded = F.pad(pooled, (0, 0, 1, 1, 1, 1))  # [N, out + 2, out + 2, d], zeros around
    kernel = w["peg.peg.0.weight"][:, 0]  # [d, 3, 3]: one filter per channel
    peg = w["peg.peg.0.bias"] + sum(padded[:, a:a + out, b:b + out] * kernel[:, a, b] for a in range(3) for b in range(3))
    return (pooled + peg).reshape(n, out * out, d)


class ReferenceMobileVLM:
    """Transformers' CLIP tower and Llama plus `reference_ldpv2`, from an original-layout directory."""

    def __init__(self, directory: Path):
        config = json.loads((directory / "config.json").read_text())
        self.config = config
        weights = load_file(directory / "model.safetensors")
        self.projector = {k.removeprefix("model.mm_projector."): v for k, v in weights.items() if k.startswith("model.mm_projector.")}
        self.tower = CLIPVisionModel.from_pretrained(config["mm_vision_tower"]).eval()
        self.llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("mm_")})).eval()
        missing, _ = self.llm.load_state_dict({k: v for k, v in weights.items() if not k.startswith("model.mm_projector.")}, strict=False)
        assert not missing, missing

    @torch.no_grad()
    def embeddings(self, input_ids, pixel_values):
        hidden = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.config["mm_vision_select_layer"]]
        visual = reference_ldpv2(hidden[:, 1:], self.projector)  # `patch`: CLS dropped
        embeds = self.llm.get_input_embeddings()(input_ids).clone()
        embeds[input_ids == self.config["image_token_index"]] = visual.reshape(-1, visual.shape[-1])  # one image per row, in order
        return embeds

    @torch.no_grad()
    def logits(self, input_ids, attention_mask, pixel_values):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.llm(inputs_embeds=self.embeddings(input_ids, pixel_values), attention_mask=attention_mask,
                        position_ids=positions).logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens: int, eos_token_id: int, pad_token_id: int = 0):
        return self.llm.generate(inputs_embeds=self.embeddings(input_ids, pixel_values), attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
