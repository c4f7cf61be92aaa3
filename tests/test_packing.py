"""Packed rows in the model (models/packed_attention.py): every sample of a packed row gets the logits, the
loss and the RoPE tables it gets alone, under every plan preset on LLaVA-1.5, LLaVA-NeXT and InternVL, and
under every one that applies on Qwen2-VL / 2.5-VL (M-RoPE) (fp32, prefill); changing one sample never changes another's
outputs; the CUDA kernel is chosen without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.packed_attention import block_causal_mask, choose_backend, sample_offsets
from tests.helpers import internvl_images, next_images, tiny_internvl_config, tiny_next_config
from tests.test_plans import VARIANTS, ids, plan_model
from tests.test_plans_qwen import RUNNABLE as QWEN_RUNNABLE  # the presets that apply to M-RoPE

def samples(config, n_images: int, seed: int = 0, image_sizes=None, ends: tuple[int, int] | None = None) -> list[dict]:
    """Samples of different lengths: `n_images` with one image each (prefix, image, suffix) and a text-only one;
    `ends`: the ids written around each image's placeholders (Qwen's vision start and end)."""
    g = torch.Generator().manual_seed(seed)
    vocab = config.hf_text_config().vocab_size
    out = []
    for i in range(n_images + 1):
        prefix, suffix = 2 + i, 9 - 2 * i if i < n_images else 11
        if i < n_images:
            n_v = config.tokens_per_image(image_sizes[i]) if image_sizes else config.num_image_tokens
            image = [torch.full((n_v,), config.image_token_id)]
            if ends:
                image = [torch.tensor([ends[0]]), *image, torch.tensor([ends[1]])]
        else:
            image = []
        low = 7 if ends else 4  # never a special id
        ids_ = torch.cat([torch.randint(low, vocab, (prefix,), generator=g), *image, torch.randint(low, vocab, (suffix,), generator=g)])
        labels = torch.full_like(ids_, -100)
        labels[-suffix + 1:] = ids_[-suffix + 1:]  # the answer: after the image's newline-like token
        out.append({"ids": ids_, "labels": labels, "image": i < n_images})
    return out


def pack(rows: list[list[dict]]):
    """Right-padded packed rows: ids, mask, labels, sample_index (padding continues the last sample)."""
    length = max(sum(len(s["ids"]) for s in row) for row in rows)
    ids_ = torch.zeros(len(rows), length, dtype=torch.long)
    mask, labels, index = torch.zeros_like(ids_), torch.full_like(ids_, -100), torch.zeros_like(ids_)
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row):
            n = len(s["ids"])
            ids_[r, at : at + n], labels[r, at : at + n], mask[r, at : at + n] = s["ids"], s["labels"], 1
            index[r, at:] = k
            at += n
    return ids_, mask, labels, index


def alone(model, s: dict, pixels, sizes=None):
    out = model(s["ids"][None], None, pixels, labels=s["labels"][None], image_sizes=sizes)
    return model(s["ids"][None], None, pixels, logits="all", image_sizes=sizes).logits[0], out.loss_sum


def assert_packed_equals_alone(model, rows, pixels_of, sizes_of=None, atol=1e-5):
    """`rows` of samples packed in one batch: per sample, the logits (text tokens) and loss sum it gets alone."""
    flat = [s for row in rows for s in row]
    with_image = [i for i, s in enumerate(flat) if s["image"]]
    pixels = torch.cat([pixels_of(i) for i in with_image]) if with_image else None
    sizes = torch.cat([sizes_of(i) for i in with_image]) if sizes_of and with_image else None
    ids_, mask, labels, index = pack(rows)
    assert_positions_restart(model, rows, ids_, mask, index, pixels, sizes, pixels_of, sizes_of)
    with torch.no_grad():
        got = model(ids_, mask, pixels, logits="all", image_sizes=sizes, sample_index=index).logits
        loss = model(ids_, mask, pixels, labels=labels, image_sizes=sizes, sample_index=index).loss_sum
        want_loss = 0.0
        i = 0
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                img = pixels_of(i) if s["image"] else None
                want, want_sum = alone(model, s, img, sizes_of(i) if sizes_of and s["image"] else None)
                text = s["ids"] != model.config.image_token_id
                part = got[r, at : at + len(s["ids"])]
                assert torch.isfinite(part[text]).all()
                assert (part - want)[text].abs().max().item() <= atol, f"sample {i} (row {r})"
                want_loss = want_loss + want_sum
                at += len(s["ids"])
                i += 1
    assert abs(float(loss) - float(want_loss)) <= 1e-4 * max(1.0, abs(float(want_loss)))


def assert_positions_restart(model, rows, ids_, mask, index, pixels, sizes, pixels_of, sizes_of):
    """Each packed sample's RoPE tables (text and visual tokens) are those it has alone: positions restart.
    (Logits alone cannot show it: RoPE attention depends on relative positions only.)"""
    with torch.no_grad():
        _, text, vis = model.embed_inputs(ids_, mask, pixels, sizes, sample_index=index)
        i = 0
        for r, row in enumerate(rows):
            want_text, want_vis = [], []
            for s in row:
                img = pixels_of(i) if s["image"] else None
                size = sizes_of(i) if sizes_of and s["image"] else None
                _, t, v = model.embed_inputs(s["ids"][None], torch.ones_like(s["ids"])[None], img, size)
                want_text.append(t.cos[0][t.valid[0]])
                want_vis.append(v.cos[0][v.valid[0]])
                i += 1
            assert torch.equal(text.cos[r][text.valid[r]], torch.cat(want_text))
            assert torch.equal(vis.cos[r][vis.valid[r]], torch.cat(want_vis))


@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_packed_rows_give_each_sample_its_own_logits_and_loss(variant):
    """Two packed rows of 3 and 2 samples (images and a text-only sample, different lengths) on LLaVA-1.5."""
    model = plan_model(*variant)
    s = samples(model.config, n_images=4)
    g = torch.Generator().manual_seed(1)
    size = model.config.hf_vision_config().image_size
    images = torch.randn(5, 3, size, size, generator=g)
    order = [s[0], s[4], s[1], s[2], s[3]]  # row 0: image, text-only, image; row 1: two images
    image_of = {0: 0, 2: 1, 3: 2, 4: 3}  # flat sample index -> its image
    assert_packed_equals_alone(model, [order[:3], order[3:]], lambda i: images[image_of[i]][None])


@pytest.mark.parametrize("name", ["dense", "pdrop", "vica"])
def test_packed_rows_on_a_qwen2_decoder(name):
    """The same on a Qwen2 LLM (biased projections) under a SigLIP tower (no CLS token)."""
    from tests.helpers import tiny_config

    model = plan_model(name, {}, config=tiny_config(vision="siglip", text="qwen2", text_layers=8, image_size=32))
    s = samples(model.config, n_images=2)
    size = model.config.hf_vision_config().image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    assert_packed_equals_alone(model, [[s[2], s[0], s[1]]], lambda i: images[i - 1][None])


TILED = {"llava_next": (tiny_next_config, next_images), "internvl": (tiny_internvl_config, internvl_images)}


@pytest.mark.parametrize("family", sorted(TILED))
@pytest.mark.parametrize("variant", VARIANTS, ids=ids)
def test_packed_tiled_rows_keep_each_tiling_to_its_sample(family, variant):
    """LLaVA-NeXT (a wide, a tall and a 2 x 2-tile image: different token counts, newlines) and InternVL
    (4 x 1 tiles + thumbnail, 1 x 2 + thumbnail, one tile), three tilings in one row."""
    config, images_of = TILED[family]
    model = plan_model(*variant, config=config(text_layers=8))
    processor = model.config.model_family.image_processor(model.config)
    images = [processor(im) for im in images_of(0)]
    s = samples(model.config, n_images=3, image_sizes=[im.size for im in images])
    tiles = max(len(im.pixels) for im in images)

    image_of = {0: 0, 2: 1, 3: 2}  # flat sample index -> its image (sample 1 is the text-only one)

    def pixels_of(i):
        image = images[image_of[i]]
        out = torch.zeros(1, tiles, *image.pixels.shape[1:])
        out[0, : len(image.pixels)] = image.pixels
        return out

    assert_packed_equals_alone(model, [[s[0], s[3], s[1], s[2]]], pixels_of, lambda i: torch.tensor([images[image_of[i]].size]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("variant", QWEN_RUNNABLE, ids=ids)
def test_packed_qwen_rows_restart_m_rope_per_sample(family, variant):
    """Qwen2-VL / 2.5-VL: three images of different grids in one packed row, each sample's M-RoPE (t, h, w)
    ids restarted as if it were alone (the family's own rule, models/packed_positions.py)."""
    from tests.helpers import qwen_images, tiny_qwen_config

    model = plan_model(*variant, config=tiny_qwen_config(family, text_layers=8))
    processor = model.config.model_family.image_processor(model.config)
    images = [processor(im) for im in qwen_images(0)]
    ids_ = model.config.token_ids
    s = samples(model.config, n_images=3, image_sizes=[im.size for im in images],
                ends=(ids_["vision_start_token_id"], ids_["vision_end_token_id"]))
    image_of = {0: 0, 2: 1, 3: 2}  # flat sample index -> its image (sample 1 is the text-only one)
    assert_packed_equals_alone(model, [[s[0], s[3], s[1]], [s[2]]], lambda i: images[image_of[i]].pixels,
                               lambda i: torch.tensor([images[image_of[i]].size]))


@pytest.mark.parametrize("name", ["dense", "fastv", "vica", "xattn", "visipruner"])
def test_changing_one_sample_never_changes_another(name):
    model = plan_model(name, {})
    s = samples(model.config, n_images=2)
    size = model.config.hf_vision_config().image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    ids_, mask, _, index = pack([[s[0], s[1]]])
    first = len(s[0]["ids"])
    changed_ids, changed_pixels = ids_.clone(), pixels.clone()
    changed_ids[0, 0] = (changed_ids[0, 0] + 1) % 100 + 4  # sample 0's first token and its image
    changed_pixels[0] += 1.0
    with torch.no_grad():
        base = model(ids_, mask, pixels, logits="all", sample_index=index).logits[0]
        other = model(changed_ids, mask, changed_pixels, logits="all", sample_index=index).logits[0]
    text = ids_[0] != model.config.image_token_id
    assert (base - other)[first:][text[first:]].abs().max().item() == 0.0  # sample 1: not a bit changes
    assert (base - other)[:first][text[:first]].abs().max().item() > 1e-3  # sample 0 does


def test_the_block_mask_equals_attention_per_sample_with_grads():
    """The CPU kernel (dense block-diagonal causal SDPA) equals SDPA run on each sample alone, with GQA."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7]
    n, pad = sum(lengths), 3
    q = torch.randn(1, 4, n + pad, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, n + pad, 8, generator=g, requires_grad=True)
    v = torch.randn(1, 2, n + pad, 8, generator=g, requires_grad=True)
    order = torch.arange(n + pad)[None]
    start = torch.tensor([0] * 5 + [5] + [6] * 7 + [6] * pad)[None]
    valid = order < n
    from models.attention import sdpa

    packed = sdpa(q, k, v, 0.3, mask=block_causal_mask(order, start, valid))[:, :, :n]
    parts, at = [], 0
    for m in lengths:
        sl = slice(at, at + m)
        parts.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, scale=0.3, enable_gqa=True))
        at += m
    want = torch.cat(parts, 2)
    assert (packed - want).abs().max().item() <= 1e-6
    grads = torch.autograd.grad(packed.square().sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    assert max((a - b).abs().max().item() for a, b in zip(grads, want_grads)) <= 1e-5
    offsets, longest = sample_offsets(start, valid)
    assert offsets.tolist() == [0, 5, 6, 13] and offsets.dtype == torch.int32 and longest == 7


def test_the_kernel_is_chosen_by_device_and_dtype():
    assert choose_backend("auto", "cuda", torch.bfloat16) == "varlen"
    assert choose_backend("auto", "cuda", torch.float16) == "varlen"
    assert choose_backend("auto", "cuda", torch.float32) == "sdpa"  # varlen_attn takes half precision only
    assert choose_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert choose_backend("sdpa", "cuda", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="varlen needs CUDA"):
        choose_backend("varlen", "cpu", torch.float32)
    with pytest.raises(ValueError, match="model.attention must be one of"):
        choose_backend("flash", "cuda", torch.bfloat16)


def test_packed_rows_are_refused_where_they_have_no_meaning():
    model = plan_model("dense", {})
    s = samples(model.config, n_images=0)
    ids_, mask, _, index = pack([[s[0]]])
    with pytest.raises(ValueError, match="decoding and query_pos"):
        model(ids_, mask, None, use_cache=True, sample_index=index)
    bad = torch.zeros_like(index)
    bad[0, 0] = 1  # sample 1 before sample 0
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids_, mask, None, sample_index=bad)
    with pytest.raises(ValueError, match="model.attention must be one of"):
        model.set_attention("flash")


def fake_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False, **_):
    """torch's varlen_attn semantics on CPU, one sample at a time ([T, H, dh] packed, causal by window (-1, 0))."""
    assert window_size == (-1, 0) and cu_seq_q.dtype == torch.int32 and isinstance(max_q, int)
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    out = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        part = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*part, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(out)


def test_the_varlen_path_lays_out_samples_as_the_block_mask_sees_them(monkeypatch):
    """The CUDA path's flattening, offsets and scatter back, with varlen_attn replaced by its semantics on CPU:
    two padded rows of packed samples give the block-mask kernel's outputs (padding rows: zero)."""
    import torch.nn.attention.varlen as varlen

    from models.attention import sdpa
    from models.packed_attention import causal_attention, varlen_causal

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    g = torch.Generator().manual_seed(3)
    n = 9
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h in (4, 2, 2))
    order = torch.arange(n).expand(2, n)
    start = torch.tensor([[0, 0, 0, 3, 3, 5, 5, 5, 5], [0, 0, 0, 0, 0, 0, 6, 6, 6]])
    valid = torch.tensor([[True] * 9, [True] * 7 + [False] * 2])
    got = varlen_causal(q, k, v, 0.5, start, valid)
    want = sdpa(q, k, v, 0.5, mask=block_causal_mask(order, start, valid))
    assert (got - want)[valid[:, None, :, None].expand_as(got)].abs().max().item() <= 1e-6
    assert got[1, :, 7:].abs().max().item() == 0.0
    assert causal_attention(q, k, v, 0.5, order, valid, start, backend="sdpa").equal(want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn runs on CUDA only")
def test_varlen_on_cuda_matches_the_block_mask_in_bf16():
    from models.attention import sdpa
    from models.packed_attention import causal_attention

    g = torch.Generator().manual_seed(0)
    n = 64
    q, k, v = (torch.randn(2, h, n, 64, generator=g).cuda().bfloat16() for h in (8, 2, 2))
    order = torch.arange(n, device="cuda").expand(2, n)
    start = torch.tensor([0] * 20 + [20] * 30 + [50] * 14, device="cuda").expand(2, n).contiguous()
    valid = torch.ones(2, n, dtype=torch.bool, device="cuda")
    got = causal_attention(q, k, v, 0.125, order, valid, start)  # auto: varlen
    want = sdpa(q.float(), k.float(), v.float(), 0.125, mask=block_causal_mask(order, start, valid))
    assert (got.float() - want).abs().max().item() <= 2e-2


def test_packed_rows_take_the_block_mask_and_unpacked_rows_keep_is_causal():
    from models.attention import record_sdpa_calls

    model = plan_model("dense", {})
    s = samples(model.config, n_images=1)
    ids_, mask, _, index = pack([[s[0], s[1]]])
    size = model.config.hf_vision_config().image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad(), record_sdpa_calls() as packed:
        model(ids_, mask, pixels, sample_index=index, logits="all")
    with torch.no_grad(), record_sdpa_calls() as unpacked:
        model(ids_, mask, pixels, logits="all")
    n = ids_.shape[1]
    assert [c.mask for c in packed] == ["mask"] * 8 and {c.mask_shape for c in packed} == {(1, 1, n, n)}
    assert [c.mask for c in unpacked] == ["causal"] * 8


def test_positions_are_the_family_rule_run_on_each_sample_alone():
    """models/packed_positions.py with a 3-D rule (M-RoPE-shaped [3, rows, n]): each sample of each packed
    row gets the ids the rule gives it as a row of its own; padding gets 0."""
    from models.packed_positions import packed_positions
    from models.streams import sample_starts

    def rule(ids, mask):  # depends on the row's tokens and their place: (order, order + first id, id)
        order = (mask.cumsum(-1) - 1).clamp(min=0)
        return torch.stack([order, order + ids[:, :1], ids]) * mask

    ids_ = torch.tensor([[5, 6, 7, 8, 9, 0], [4, 3, 2, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    index = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 2, 2, 2]])
    order = (mask.cumsum(-1) - 1).clamp(min=0)
    got = packed_positions(rule, ids_, mask, order, sample_starts(order, index))
    assert got.shape == (3, 2, 6)
    assert got[0].tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 0, 0, 0]]
    assert got[1].tolist() == [[5, 6, 7, 8, 9, 0], [4, 3, 4, 1, 0, 0]]
    assert got[2].tolist() == (ids_ * mask).tolist()
