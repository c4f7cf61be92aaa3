"""Prefill and a training step of every preset make no host sync (models/dispatch_count.py: nothing read
back from the device, no tensor copied from host memory) once the batch's sizes come from the host
(`MLLM.batch_sizes` on the CPU batch, models/host_sizes.py), on every family. Allowed exceptions, each
with its reason, may sync only where they say."""

import pytest
import torch

from models.dispatch_count import count_dispatch
from tests.test_decoding import FAMILIES, family_model, llava_inputs
from tests.test_plans import PRESETS, plan_model

ALLOWED = {  # preset -> (the only files it may sync in, why)
    "cls_knee": ({"models/pruning.py", "models/selection.py"}, "the knee of each CLS-similarity curve is the data's: "
                 "curves are cut on the host, and the kept stream's width is read back"),
    "visipruner": ({"models/selection.py"}, "its middle stage keeps the tokens scoring above a threshold, a count only "
                   "the data decides: the kept stream's width is read back once"),
    "random": ({"models/blind_scores.py"}, "each image's draws come from a CPU generator seeded by the image's pixels, "
               "so a seed keeps the same tokens on any device: the images' keys are read back once"),
}


def labelled(ids, model):
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    labels[:, :-3] = -100  # the answer: the last tokens
    return labels


def censuses(model, ids, mask, pixels, kw):
    """Syncs of a prefill and of a training step (forward and backward), each after an uncounted run."""
    labels = labelled(ids, model)
    sizes = model.batch_sizes(ids, mask, pixels, kw.get("image_sizes"), labels=labels)
    model.eval()
    with torch.no_grad():
        model(ids, mask, pixels, logits="last", use_cache=True, sizes=sizes, **kw)
        with count_dispatch() as prefill:
            model(ids, mask, pixels, logits="last", use_cache=True, sizes=sizes, **kw)
    model.train()
    model(ids, mask, pixels, labels=labels, sizes=sizes, **kw).loss.backward()
    with count_dispatch() as train:
        model(ids, mask, pixels, labels=labels, sizes=sizes, **kw).loss.backward()
    return prefill, train


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_prefills_and_trains_without_a_host_sync(name):
    model = plan_model(name, {})
    for census in censuses(model, *llava_inputs(model.config)):
        if name not in ALLOWED:
            assert census.n_syncs == 0, census.describe()
        else:
            where = {site.split(":")[0] for sites in census.sites.values() for site in sites}
            assert where <= ALLOWED[name][0], census.describe()


TOWER_ATTENTION = "transformers' vision attention under SDPA splits the patches per image with lengths.tolist() (its flash " \
                  "attention path takes cu_seqlens instead)"
FAMILY_ALLOWED = {  # family -> (the only files it may sync in: transformers' vision code, why)
    "qwen2_vl": ({"transformers/models/qwen2_vl/modeling_qwen2_vl.py"}, TOWER_ATTENTION),
    "qwen2_5_vl": ({"transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py", "transformers/vision_utils.py"},
                   TOWER_ATTENTION + "; its window index (transformers' get_vision_window_index) is read from the grids"),
    "qwen3_vl": ({"transformers/models/qwen3_vl/modeling_qwen3_vl.py", "transformers/vision_utils.py"},
                 TOWER_ATTENTION + "; the position table's interpolation indices (transformers' vision_utils) are read from the grids"),
    "qwen3_vl_moe": ({"transformers/models/qwen3_vl_moe/modeling_qwen3_vl_moe.py", "transformers/vision_utils.py"},
                     TOWER_ATTENTION + "; the position table's interpolation indices are read from the grids"),
    "qwen3_5": ({"transformers/models/qwen3_5/modeling_qwen3_5.py", "transformers/vision_utils.py"},
                TOWER_ATTENTION + "; Qwen3-VL's position table (Qwen3.5 takes its tower)"),
    "qwen3_5_moe": ({"transformers/models/qwen3_5_moe/modeling_qwen3_5_moe.py", "transformers/vision_utils.py"},
                    TOWER_ATTENTION + "; Qwen3-VL's position table (Qwen3.5 takes its tower)"),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_prefills_and_trains_without_a_host_sync(name):
    """Our code syncs in no family; what is left is transformers' own vision code in the Qwen towers."""
    model, inputs = family_model(name)
    for census in censuses(model, *inputs):
        where = {site.split(":")[0] for sites in census.sites.values() for site in sites}
        assert where <= FAMILY_ALLOWED.get(name, (set(), ""))[0], census.describe()


def test_sizes_read_from_device_tensors_say_so():
    """Without host sizes a forward reads them back itself: the counters see it (what the test above rules out)."""
    model = plan_model("fastv", {})
    ids, mask, pixels, _ = llava_inputs(model.config)
    with torch.no_grad(), count_dispatch() as census:
        model(ids, mask, pixels, logits="last")
    where = {site.split(":")[0] for sites in census.sites.values() for site in sites}
    assert census.n_syncs > 0 and "models/host_sizes.py" in where and where <= {"models/host_sizes.py", "models/flops.py"}
