"""Tiny models and batches built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch

from models.generation import greedy_generate


def tiny_config(vision: str = "clip", text: str = "llama", text_layers: int = 3, image_size: int = 16, **overrides):
    """A few-thousand-parameter MLLM config; CLIP keeps a CLS token (dropped by 'default')."""
    from models import MLLMConfig

    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=image_size, patch_size=4)
    vision_cfg["model_type"] = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "internvit": "internvl_vision"}[vision]
    text_cfg = dict(
        model_type=text,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    args = dict(
        vision=vision_cfg,
        text=text_cfg,
        image_token_id=3,
        vision_feature_select_strategy="full" if vision == "siglip" else "default",
    )
    args.update(overrides)
    return MLLMConfig(**args)


def qwen3_text(moe: bool = False, text_layers: int = 3, **overrides) -> dict:
    """A tiny Qwen3 (or Qwen3-MoE: 4 experts, 2 per token) text config section: per-head q/k norms,
    head_dim 16 (Qwen3's own field; 128 by default)."""
    text = dict(model_type="qwen3_moe" if moe else "qwen3", vocab_size=128, hidden_size=64, intermediate_size=128,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.01)
    else:
        text["head_dim"] = 16
    return text | overrides


def tiny_model(seed: int = 0, **kw):
    from models import MLLM

    torch.manual_seed(seed)
    return MLLM.from_config(tiny_config(**kw)).eval()


def exported_pair(config, hf_class, directory, seed: int = 0):
    """Our model of `config` and transformers' `hf_class` loaded from our export in `directory` (so a
    test of the pair also checks save_pretrained), both in eval mode."""
    from models import MLLM

    torch.manual_seed(seed)
    ours = MLLM.from_config(config).eval()
    ours.save_pretrained(directory)
    return ours, hf_class.from_pretrained(directory).eval()


def image_batch(config, batch: int, prefix: int = 3, suffix: int = 6, pad_left: list[int] | None = None, seed: int = 0):
    """Random ids with one expanded image per row; `pad_left[i]` pad tokens at the start of row i."""
    g = torch.Generator().manual_seed(seed)
    n_v = config.num_image_tokens
    prefix += max(pad_left or [0])  # padding never covers the image
    length = prefix + n_v + suffix
    ids = torch.randint(4, config.hf_text_config().vocab_size, (batch, length), generator=g)
    ids[:, prefix : prefix + n_v] = config.image_token_id
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, n in enumerate(pad_left or []):
        ids[i, :n] = 0
        mask[i, :n] = 0
    size = config.hf_vision_config().image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    return ids, mask, pixels


def left_padded(rows: list, pad_left: list[int] | None = None):
    """Rows of ids left-padded (id 0) to the longest plus `pad_left[i]` more: ids and mask [B, L]."""
    pad_left = pad_left or [0] * len(rows)
    length = max(len(r) + p for r, p in zip(rows, pad_left))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]  # canvases of 16 px tiles: 1 x 2, 2 x 1, 2 x 2


def tiny_next_config(text_layers: int = 3, **overrides):
    """A tiny LLaVA-NeXT config: CLIP tiles of 16 px (a 4 x 4 grid each) over the canvases above."""
    return tiny_config(text_layers=text_layers, family="llava_next", image_grid_pinpoints=NEXT_PINPOINTS, **overrides)


def tiny_mobilevlm_config(text_layers: int = 3, **overrides):
    """A tiny MobileVLM V2 config: a CLIP tower over 64 px images (a 16 x 16 patch grid, CLS dropped), LDPv2
    pooling it to 12 x 12 = 144 tokens, a Llama LLM."""
    return tiny_config(text_layers=text_layers, image_size=64, family="mobilevlm", projector="ldpnetv2", **overrides)


def tiny_internvl_config(text_layers: int = 3, **overrides):
    """A tiny InternVL config: InternViT tiles of 32 px (an 8 x 8 patch grid, 4 x 4 tokens after the
    pixel shuffle), at most 4 tiles per image (+ the thumbnail), a Qwen2 LLM."""
    overrides = {"vision_feature_layer": -1, "max_tiles": 4, "image_mean": (0.485, 0.456, 0.406),
                 "image_std": (0.229, 0.224, 0.225), **overrides}
    return tiny_config("internvit", "qwen2", text_layers, image_size=32, family="internvl", **overrides)


def next_images(seed: int = 0):
    """A wide (1 x 2 tiles, unpadded to 2 of 4 rows), a tall (2 x 1, 2 of 4 columns) and a 2 x 2-tile image."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((10, 44), (44, 10), (31, 23))]


def internvl_images(seed: int = 0):
    """A wide (4 x 1 tiles + thumbnail), a tall-ish (1 x 2 + thumbnail) and a one-tile image."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((10, 44), (31, 23), (20, 21))]


def next_batch(config, pad_left: list[int] | None = None, seed: int = 0, prefix: int = 3, suffix: int = 5, images=None):
    """One image per row (`next_images`, or `images(seed)`), each row's own number of placeholders,
    left padding to the longest row plus `pad_left[i]`: ids, mask, pixel_values [3, max_tiles, 3, S, S]
    (zero tiles after each image's own), image_sizes."""
    processor = config.model_family.image_processor(config)
    images = [processor(image) for image in (images or next_images)(seed)]
    g = torch.Generator().manual_seed(seed)
    vocab = config.hf_text_config().vocab_size
    rows = []
    for image in images:
        n_v = config.tokens_per_image(image.size)
        text = torch.randint(4, vocab, (prefix + suffix,), generator=g)
        rows.append(torch.cat([text[:prefix], torch.full((n_v,), config.image_token_id), text[prefix:]]))
    ids, mask = left_padded(rows, pad_left)
    tiles = max(len(im.pixels) for im in images)
    pixels = torch.zeros(len(images), tiles, *images[0].pixels.shape[1:])
    for i, im in enumerate(images):
        pixels[i, : len(im.pixels)] = im.pixels
    return ids, mask, pixels, torch.tensor([im.size for im in images])


def internvl_hf_batch(config, pad_left: list[int] | None = None, seed: int = 0):
    """transformers' InternVL inputs: each image written `<img>` + its placeholders + `</img>` (ids 4 and
    5), as InternVLProcessor does; row 0 holds the wide image (5 tiles), row 1 the 3-tile and the 1-tile
    one, row 2 only text; left padding. Returns ids, mask, pixel_values flat [9 tiles, 3, S, S] (what
    transformers' forward takes, without sizes) and, for comparison, our collator's padded
    [3 images, 5 tiles, 3, S, S] with image_sizes."""
    processor = config.model_family.image_processor(config)
    images = [processor(image) for image in internvl_images(seed)]
    g = torch.Generator().manual_seed(seed)
    vocab = config.hf_text_config().vocab_size

    def text(n):
        return torch.randint(6, vocab, (n,), generator=g)

    def image(im):
        return torch.cat([torch.tensor([4]), torch.full((config.tokens_per_image(im.size),), config.image_token_id), torch.tensor([5])])

    rows = [torch.cat([text(3), image(images[0]), text(4)]),
            torch.cat([text(2), image(images[1]), text(2), image(images[2]), text(3)]),
            text(9)]
    ids, mask = left_padded(rows, pad_left)
    padded = torch.zeros(len(images), max(len(im.pixels) for im in images), *images[0].pixels.shape[1:])
    for i, im in enumerate(images):
        padded[i, : len(im.pixels)] = im.pixels
    return ids, mask, torch.cat([im.pixels for im in images]), padded, torch.tensor([im.size for im in images])


QWEN_TOKENS = {"vision_start_token_id": 4, "vision_end_token_id": 5, "video_token_id": 6}


def tiny_qwen_config(family: str = "qwen2_vl", text_layers: int = 3, **overrides):
    """A tiny Qwen2-VL (or `family="qwen2_5_vl"`) config: patches of 4 px merged 2 x 2, so an image
    gives one token per 8 x 8 pixels of its `smart_resize` (within 4..64 tokens); M-RoPE sections
    [2, 3, 3] over head_dim 16. Qwen2.5-VL windows cover 2 x 2 tokens and block 1 attends fully, and its
    M-RoPE counts 2 time positions per second (the released models' tokens_per_second)."""
    from models import MLLMConfig

    if family == "qwen2_vl":
        vision = dict(model_type="qwen2_vl_vision", depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64, patch_size=4)
    else:
        vision = dict(model_type="qwen2_5_vl_vision", depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                      num_heads=2, patch_size=4, window_size=16, fullatt_block_indexes=[1], tokens_per_second=2)
    text = dict(model_type=f"{family}_text", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    args = dict(vision=vision, text=text, family=family, image_token_id=3, token_ids=dict(QWEN_TOKENS),
                min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 64)
    args.update(overrides)
    return MLLMConfig(**args)


def tiny_qwen3_vl_config(moe: bool = False, text_layers: int = 3, **overrides):
    """A tiny Qwen3-VL (or Qwen3-VL-MoE: 4 experts, 2 per token) config: patches of 4 px merged 2 x 2
    (one token per 8 x 8 pixels, as `tiny_qwen_config`), a 4 x 4 learned position table, DeepStack from
    both tower blocks (added after decoder layers 0 and 1), interleaved M-RoPE sections [4, 2, 2] over
    head_dim 16."""
    from models import MLLMConfig

    family = "qwen3_vl_moe" if moe else "qwen3_vl"
    vision = dict(model_type=f"{family}_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    text = dict(model_type=f"{family}_text", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, router_aux_loss_coef=0.01)
    args = dict(vision=vision, text=text, family=family, image_token_id=3, token_ids=dict(QWEN_TOKENS),
                min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 64, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    args.update(overrides)
    return MLLMConfig(**args)


def tiny_qwen3_5_config(moe: bool = False, text_layers: int = 4, **overrides):
    """A tiny Qwen3.5 (or Qwen3.5-MoE: 4 experts, 2 per token, a shared expert) config: Qwen3-VL's tiny tower
    (`tiny_qwen3_vl_config`) without DeepStack, a hybrid LLM of `text_layers` layers, every fourth (3, 7, ...)
    full attention (gated, head_dim 32 rotated on its first quarter: M-RoPE sections [2, 1, 1]) and the others
    Gated DeltaNet (a 4-tap conv, 2 key heads and 4 value heads of 16)."""
    from models import MLLMConfig

    family = "qwen3_5_moe" if moe else "qwen3_5"
    vision = dict(model_type=f"{family}_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16)
    text = dict(model_type=f"{family}_text", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                 "partial_rotary_factor": 0.25})
    if moe:  # no dense MLP: every layer is a mixture of experts
        del text["intermediate_size"]
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                    router_aux_loss_coef=0.01)
    args = dict(vision=vision, text=text, family=family, image_token_id=3, token_ids=dict(QWEN_TOKENS),
                min_pixels=8 * 8 * 4, max_pixels=8 * 8 * 64, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    args.update(overrides)
    return MLLMConfig(**args)


def qwen_images(seed: int = 0):
    """A wide (3 x 5 tokens), a tall (5 x 2) and an odd-sized image (resized to 4 x 3 tokens)."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((24, 40), (40, 16), (33, 27))]


def qwen_batch(config, pad_left: list[int] | None = None, seed: int = 0, prefix: int = 3, suffix: int = 5, images=None,
               images_per_row: list[int] | None = None):
    """Rows of images as the Qwen processors lay them out (`<|vision_start|>` + one `<|image_pad|>`
    per token + `<|vision_end|>`, text between), one image per row unless `images_per_row` says how
    many of the images (in order) each row holds (0: a text-only row), left padding to the longest row
    plus `pad_left[i]`: ids, mask, pixel_values [sum t*h*w, patch pixels] (every image's patches,
    concatenated), image_grid_thw [n, 3] and mm_token_type_ids."""
    processor = config.model_family.image_processor(config)
    processed = [processor(image) for image in (images or qwen_images(seed))]
    per_row = images_per_row or [1] * len(processed)
    g = torch.Generator().manual_seed(seed)
    vocab = config.hf_text_config().vocab_size
    start, end = config.token_ids["vision_start_token_id"], config.token_ids["vision_end_token_id"]
    rows, queue = [], iter(processed)
    for count in per_row:
        parts = [torch.randint(7, vocab, (prefix,), generator=g)]
        for _ in range(count):
            n_v = config.tokens_per_image(next(queue).size)
            parts += [torch.tensor([start]), torch.full((n_v,), config.image_token_id), torch.tensor([end]),
                      torch.randint(7, vocab, (2,), generator=g)]
        parts.append(torch.randint(7, vocab, (suffix,), generator=g))
        rows.append(torch.cat(parts))
    used = sum(per_row)
    ids, mask = left_padded(rows, pad_left)
    types = ((ids == config.image_token_id) & mask.bool()).long()
    return (ids, mask, torch.cat([im.pixels for im in processed[:used]]), torch.tensor([im.size for im in processed[:used]]),
            types)


def qwen_frames(seed: int = 0):
    """Three random videos (uint8 [F, H, W, 3]): 4 frames of 32 x 32 (2 steps of 4 x 4 tokens), 5 of
    24 x 40 (3 steps of 3 x 5, the last frame repeated) and 2 of 16 x 24 (1 step of 2 x 3)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((4, 32, 32, 3), (5, 24, 40, 3), (2, 16, 24, 3))]


def qwen_visual_batch(config, rows: list[list[str]], pad_left: list[int] | None = None, seed: int = 0,
                      fps: tuple[float, ...] = (2.0, 1.0, 4.0)):
    """Rows of Qwen prompts holding images ("image k", `qwen_images`) and videos ("video k",
    `qwen_frames` sampled at `fps[k]`) in the given order, each as `<|vision_start|>` + its pads +
    `<|vision_end|>` between random text, left padded: ids, mask, transformers' inputs (`hf`: pixel
    values, grids, second_per_grid_ts, mm_token_type_ids) and ours (`ours`: the items in prompt order,
    as the data path gives them)."""
    images = [config.model_family.image_processor(config)(im) for im in qwen_images(seed)]
    videos = [config.model_family.video_processor(config)(frames, f) for frames, f in zip(qwen_frames(seed), fps)]
    g = torch.Generator().manual_seed(seed)
    vocab = config.hf_text_config().vocab_size
    start, end = config.token_ids["vision_start_token_id"], config.token_ids["vision_end_token_id"]
    pads = {"image": config.image_token_id, "video": config.token_ids["video_token_id"]}
    ids, used = [], {"image": [], "video": []}
    items = []
    for row in rows:
        out = torch.randint(7, vocab, (3,), generator=g).tolist()
        for name in row:
            kind, k = name.split()
            item = (images if kind == "image" else videos)[int(k)]
            out += [start, *[pads[kind]] * config.tokens_per_image(item.size), end, *torch.randint(7, vocab, (2,), generator=g).tolist()]
            used[kind].append(item)
            items.append(item)
        ids.append(torch.tensor(out))
    ids, mask = left_padded(ids, pad_left)
    types = ((ids == pads["image"]).long() + 2 * (ids == pads["video"]).long()) * mask
    hf = {"mm_token_type_ids": types}
    if used["image"]:
        hf |= {"pixel_values": torch.cat([im.pixels for im in used["image"]]), "image_grid_thw": torch.tensor([im.size for im in used["image"]])}
    if used["video"]:
        hf |= {"pixel_values_videos": torch.cat([v.pixels for v in used["video"]]), "video_grid_thw": torch.tensor([v.size for v in used["video"]]),
               "second_per_grid_ts": torch.tensor([v.step_seconds for v in used["video"]])}
    ours = {"pixel_values": torch.cat([it.pixels for it in items]), "image_sizes": torch.tensor([it.size for it in items]),
            "step_seconds": torch.tensor([getattr(it, "step_seconds", 0.0) for it in items])}
    return ids, mask, hf, ours


def qwen_word_tokenizer(image_token: str = "<image>"):
    """Words w7..w99 and the tiny Qwen config's special tokens at its ids (`image_token` = 3, the vision
    start / end = 4 / 5, the video pad = 6): `<image>` as in our data, or `<|image_pad|>` as in the Qwen
    checkpoints' tokenizers (which have no `<image>`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {image_token: 3, "<|vision_start|>": 4, "<|vision_end|>": 5, "<|video_pad|>": 6}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 100} | specials | {f"w{i}": i for i in range(7, 100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=list(specials))


def assert_hf_directories_round_trip(ours, hf, directory, batch) -> None:
    """A directory transformers' `hf` writes loads into `MLLM` (same family, same logits as `ours` on
    `batch` = (ids, mask, pixels, image_sizes)), and ours saved again loads with an unchanged config and logits."""
    from models import MLLM

    hf.save_pretrained(directory / "hf")
    loaded = MLLM.from_pretrained(directory / "hf").eval()
    assert loaded.family.name == ours.family.name
    ids, mask, pixels, sizes = batch
    with torch.no_grad():
        want = ours(ids, mask, pixels, logits="last", image_sizes=sizes).logits
        assert torch.equal(loaded(ids, mask, pixels, logits="last", image_sizes=sizes).logits, want)
    loaded.save_pretrained(directory / "again")
    again = MLLM.from_pretrained(directory / "again").eval()
    assert again.config.hf_config().to_dict() == ours.config.hf_config().to_dict()
    assert (again.config.min_pixels, again.config.max_pixels, again.config.token_ids) == \
        (ours.config.min_pixels, ours.config.max_pixels, ours.config.token_ids)
    with torch.no_grad():
        assert torch.equal(again(ids, mask, pixels, logits="last", image_sizes=sizes).logits, want)


def image_patches(pixels, grids):
    """(patches [t*h*w, patch pixels], grid [1, 3]) of each image of a Qwen batch (patches concatenated)."""
    start = 0
    for grid in grids.tolist():
        n = grid[0] * grid[1] * grid[2]
        yield pixels[start : start + n], torch.tensor([grid])
        start += n


def assert_greedy_matches_hf(ours, hf, ids, mask, pixels, hf_pixels: dict, **image_inputs):
    """Our greedy decoding (10 new tokens, eos 127, pad 0) equals transformers' `generate` on the same
    prompts; `hf_pixels`: the HF model's own image inputs, `image_inputs`: ours (e.g. `image_sizes`)."""
    got = greedy_generate(ours, ids, mask, pixels, max_new_tokens=10, eos_token_id=[127], pad_token_id=0, **image_inputs)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, **hf_pixels, max_new_tokens=10, do_sample=False,
                           eos_token_id=127, pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(got, want[:, : got.shape[1]])
    return got


MIXED_ROWS = dict(images_per_row=[1, 0, 2], pad_left=[0, 3, 1])  # one image, text only, two images (three grids)


def assert_positions_match_get_rope_index(ours, hf):
    """Our M-RoPE ids and each row's next position equal transformers' `get_rope_index` on `MIXED_ROWS`."""
    from models.mllm import next_positions

    ids, mask, pixels, grids, types = qwen_batch(ours.config, **MIXED_ROWS)
    want, deltas = hf.model.get_rope_index(ids, types, grids, attention_mask=mask)
    got = ours.prompt_positions(ids, mask, grids)
    assert torch.equal(got * mask, want * mask)
    assert torch.equal(next_positions(got, mask), mask.sum(1) + deltas.flatten())


def assert_forward_matches_hf(ours, hf, load_balancing_loss_func=None):
    """On `MIXED_ROWS` (three grids of different sizes, left padding): logits and loss equal transformers'
    (fp32, 1e-5), transformers' inputs accepted; with `load_balancing_loss_func` (MoE LLMs) the
    load-balancing loss too."""
    ids, mask, pixels, grids, types = qwen_batch(ours.config, **MIXED_ROWS)
    assert len(set(grids.prod(-1).tolist())) == 3
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=types)
    moe = load_balancing_loss_func is not None
    with torch.no_grad():
        got = ours(ids, mask, pixels, image_grid_thw=grids, mm_token_type_ids=types)
        loss = ours(ids, mask, pixels, labels=labels, image_sizes=grids).loss
        want = hf(**inputs, output_router_logits=moe) if moe else hf(**inputs)
        want_loss = hf(**inputs, labels=labels).loss
    valid = mask.bool()
    assert torch.isfinite(got.logits[valid]).all()
    assert (got.logits - want.logits)[valid].abs().max().item() <= 1e-5
    assert abs(loss.item() - want_loss.item()) <= 1e-5
    if moe:
        t = ours.text_config
        want_aux = load_balancing_loss_func(want.router_logits, t.num_experts, t.num_experts_per_tok, mask)
        assert abs(got.moe_aux_loss.item() - want_aux.item()) <= 1e-6
