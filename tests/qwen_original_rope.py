"""The test oracle of `mrope_rule=qwen`: Qwen's original M-RoPE rule, as transformers 4.x (up to 5.2)
and the Qwen authors' `get_rope_index` (PR #35569) compute it, written here independently of
models/families/qwen2_vl.py and in the old loop's shape: each row is scanned from placeholder to
placeholder, text continues one past the largest position so far, and a video's time index is
`(k * second_per_grid_t * tokens_per_second).long()` (Qwen2.5-VL; Qwen2-VL's is k), still images
getting 0 s per step. The deltas are the old ones too: largest position + 1 - the padded row's length.
"""

from __future__ import annotations

import torch


def original_rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts, *, merge: int,
                        image_id: int, video_id: int, tokens_per_second: int | None):
    """Position ids [3, B, L] (padding 1, as the old code left it) and deltas [B, 1];
    `tokens_per_second` None: Qwen2-VL (time index = step index)."""
    positions = torch.ones(3, *input_ids.shape, dtype=torch.long)
    deltas = []
    images, videos = iter(image_grid_thw if image_grid_thw is not None else []), iter(video_grid_thw if video_grid_thw is not None else [])
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    for b in range(input_ids.shape[0]):
        tokens = input_ids[b][attention_mask[b].bool()].tolist()
        parts, st = [], 0
        while True:
            at = [tokens.index(tid, st) if tid in tokens[st:] else len(tokens) for tid in (image_id, video_id)]
            ed = min(at)
            base = parts[-1].max() + 1 if parts else 0
            parts.append(torch.arange(ed - st).view(1, -1).expand(3, -1) + base)
            if ed == len(tokens):
                break
            is_video = at[1] < at[0]
            t, h, w = (int(v) for v in next(videos if is_video else images))
            h, w = h // merge, w // merge
            if tokens_per_second is None:
                t_index = torch.arange(t)
            else:
                per_step = next(seconds) if is_video else 0
                t_index = (torch.arange(t).view(-1, 1).expand(-1, h * w) * per_step * tokens_per_second).long()[:, 0]
            grid = torch.stack([t_index.view(-1, 1, 1).expand(t, h, w), torch.arange(h).view(1, -1, 1).expand(t, h, w),
                                torch.arange(w).view(1, 1, -1).expand(t, h, w)]).reshape(3, -1)
            base = parts[-1].max() + 1 if parts[-1].numel() else base
            parts.append(grid + base)
            st = ed + t * h * w
        row = torch.cat(parts, 1)
        positions[:, b, attention_mask[b].bool()] = row
        deltas.append(int(row.max()) + 1 - input_ids.shape[1])
    return positions, torch.tensor(deltas).view(-1, 1)
