"""Greedy generation with the plan-aware KV cache (prefill once, then one token per step)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .decoding import compiled_step, reserve

COMPILE_BUCKET = 64  # compiled steps: cache room rounded up to this, so generations of similar lengths share a graph


@torch.no_grad()
def greedy_generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    pixel_values: Tensor | None,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int = 0,
    sync_ranks: bool = False,
    image_sizes: Tensor | None = None,
    step_seconds: Tensor | None = None,
    compile: bool | dict = False,
    sizes=None,
) -> Tensor:
    """New tokens `[B, <=max_new_tokens]`; rows that finished are filled with `pad_token_id`.

    Works with left or right padding: each row continues from its own last valid position.
    `sync_ranks`: keep stepping until every process is done. Needed when parameters are sharded
    (ZeRO-3, FSDP): each forward is a collective, so a rank that stopped early would hang the rest.
    `image_sizes`: what tiling families (LLaVA-NeXT) need beside `pixel_values`; `step_seconds`: the
    seconds per temporal step of each item when videos are among them (models/video.py).
    The KV cache gets room for `max_new_tokens` after prefill, so every step has the same shapes;
    `compile`: run the step under `torch.compile(fullgraph=True)` (a dict: its options), a CUDA graph on
    CUDA (models/decoding.py `compiled_step`); the tokens equal the eager ones. `sizes`: the prompts'
    sizes as the host knows them (`MLLM.batch_sizes` on the CPU batch: models/host_sizes.py).
    """
    eos = torch.as_tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=input_ids.device)
    out = model(input_ids, attention_mask, pixel_values, logits="last", use_cache=True, image_sizes=image_sizes,
                step_seconds=step_seconds, sizes=sizes)
    state, logits = out.cache, out.logits
    reserve(model, state, max_new_tokens, bucket=COMPILE_BUCKET if compile else 1)
    step_fn = compiled_step(model, **(compile if isinstance(compile, dict) else {})) if compile else model.decode_step
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).masked_fill(done, pad_token_id)
        tokens.append(nxt)
        done |= torch.isin(nxt, eos)
        if _all_done(done, sync_ranks) or step == max_new_tokens - 1:
            break
        logits = step_fn(nxt, state)
    return torch.stack(tokens, 1)


def _all_done(done: Tensor, sync_ranks: bool) -> bool:
    finished = torch.tensor([int(done.all())], device=done.device)
    if sync_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(finished, op=dist.ReduceOp.MIN)
    return bool(finished.item())
