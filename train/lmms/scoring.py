"""Batched greedy answers and continuation log-likelihoods, both through the plan's prefill + KV-cache
decode path (models/generation.py), so a scored continuation sees exactly what generation sees:
the same visual tokens kept by the same scorer at the end of the prompt."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from data.chat import pad
from models.generation import greedy_generate


def _prompt_batch(model, prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    device = model.lm_head.weight.device
    ids = pad(prompts, pad_id, left=True).to(device)
    mask = pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
    return ids, mask


@torch.no_grad()
def generate(model, prompts: list[list[int]], pixel_values: Tensor | None, max_new_tokens: int, stop_ids: list[int], pad_id: int,
             image_sizes: Tensor | None = None, step_seconds: Tensor | None = None) -> list[list[int]]:
    """Greedy new tokens per prompt, cut before the first stop id."""
    ids, mask = _prompt_batch(model, prompts, pad_id)
    out = greedy_generate(model, ids, mask, pixel_values, max_new_tokens, stop_ids, pad_id, image_sizes=image_sizes,
                          step_seconds=step_seconds).tolist()
    stops = set(stop_ids)
    return [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in out]


@torch.no_grad()
def continuation_logprobs(
    model, prompts: list[list[int]], continuations: list[list[int]], pixel_values: Tensor | None, pad_id: int,
    image_sizes: Tensor | None = None, step_seconds: Tensor | None = None,
) -> list[tuple[float, bool]]:
    """Per row: the summed log-probability of `continuations[i]` after `prompts[i]`, and whether
    greedy decoding would produce exactly it. Prefill the prompts once, then feed the continuation
    tokens one decode step at a time (rows whose continuation ended keep stepping on a pad token;
    those steps are not counted)."""
    ids, mask = _prompt_batch(model, prompts, pad_id)
    out = model(ids, mask, pixel_values, logits="last", use_cache=True, image_sizes=image_sizes, step_seconds=step_seconds)
    logits, state = out.logits, out.cache
    targets = pad(continuations, pad_id).to(ids.device)  # [B, n], right-padded
    valid = pad([[1] * len(c) for c in continuations], 0).to(ids.device).bool()
    total = torch.zeros(len(prompts), dtype=torch.float64, device=ids.device)
    greedy = torch.ones(len(prompts), dtype=torch.bool, device=ids.device)
    for j in range(targets.shape[1]):
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, j, None])[:, 0]
        total += torch.where(valid[:, j], logp.double(), 0.0)
        greedy &= ~valid[:, j] | (logits.argmax(-1) == targets[:, j])
        if j + 1 < targets.shape[1]:
            logits = model.decode_step(targets[:, j], state)
    return [(float(t), bool(g)) for t, g in zip(total.tolist(), greedy.tolist())]
