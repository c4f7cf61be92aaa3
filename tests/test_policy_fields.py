"""Every `LayerPolicy` field is honoured by the three places that must know it, so a new field cannot
silently run as dense (docs/adding-a-method.md, "a new primitive"):

* the decoder's fast-path choice (`models.decoder.runs_as_one_sequence`): a field other than those in
  `ONE_SEQUENCE_FIELDS` turns the one-sequence (dense) path off as soon as it leaves its default;
* the FLOPs model (`models.flops.plan_terms`, which calls `layer_terms` per layer): the counted terms
  change, unless the value is listed in `FLOPS_NEUTRAL` with the reason it costs the same matmuls;
* the masked reference (`tests/reference.py`): its logits change, and the physical engine still
  equals it.

Each case changes one field (with the companions a valid plan needs) in layer 2 of a 4-layer model.
A field added to `LayerPolicy` fails `test_every_field_has_a_case` until it gets a case here.
"""

from dataclasses import dataclass, fields, replace

import pytest
import torch

from models import MLLM
from models.decoder import ONE_SEQUENCE_FIELDS, runs_as_one_sequence
from models.flops import Shape, plan_terms
from models.plan import DENSE, LayerPolicy, Plan, Route, Select
from tests.helpers import image_batch, tiny_config
from tests.reference import reference_logits

LAYERS, AT = 4, 2  # the case's policy sits in layer 2, so later layers read what it changed


@dataclass(frozen=True)
class Case:
    field: str
    value: object  # the field's non-default value
    fast: bool  # does the layer still run as one sequence (the dense fast path)?
    base: dict  # the policy the change starts from (its other fields)
    companions: dict  # other fields a valid plan needs together with `value`

    @property
    def id(self) -> str:
        if isinstance(self.value, Select):
            return f"select-{self.value.scorer}-{self.value.source}"
        return f"route-{self.value.keep}" if isinstance(self.value, Route) else f"{self.field}={self.value}"


def case(field, value, fast=False, base=None, **companions):
    return Case(field, value, fast, base or {}, companions)


CASES = [
    case("visual_update", "frozen"),
    case("text_reads_visual", "none"),
    case("text_reads_visual", "sink"),
    case("visual_kv_source", "embed"),
    case("visual_self_attn", "none"),
    case("visual_self_attn", "local", window=3),
    case("window", 3, base={"visual_self_attn": "local", "window": 1}),
    case("visual_heads", (0,)),
    case("visual_ffn", 0.5),
    case("select", Select(scorer="attn_last", source="previous", keep=0.5), fast=True),
    case("select", Select(scorer="attn_last", source="current", keep=0.5)),
    case("select", Select(scorer="random", keep=0.5, seed=3), fast=True),
    case("drop_visual", True, fast=True),
    case("xattn", True, fast=True),
    # on a dense layer post-softmax zeroing zeroes nothing; where text reads no visual token it keeps
    # them in the softmax's denominator (the released YOPO / VisiPruner code)
    case("mask_semantics", "post_softmax_zero", base={"text_reads_visual": "none"}),
    case("route", Route(keep=0.5), fast=True),  # chosen before the layer, which weighs the kept tokens' FFN
]

# (field, value) pairs that cost exactly the matmuls of their base, and why
FLOPS_NEUTRAL = {
    ("visual_kv_source", "embed"): "visual K/V are projected from the projector output instead of the layer input: "
                                   "the same projections over the same tokens",
    ("text_reads_visual", "sink"): "text attends over every visual key as before; the mass moves onto one token after "
                                   "the softmax",
}


def plans(c: Case) -> tuple[Plan, Plan]:
    base = replace(DENSE, **c.base)
    changed = replace(base, **{c.field: c.value}, **c.companions)

    def plan(p, name):
        return Plan(name, tuple(p if i == AT else DENSE for i in range(LAYERS)))

    return plan(base, "base"), plan(changed, c.id)


def test_every_field_has_a_case():
    missing = {f.name for f in fields(LayerPolicy)} - {c.field for c in CASES}
    assert not missing, (f"LayerPolicy fields without a case in {__file__}: {sorted(missing)}. Add one with a valid "
                         "non-default value, then make the decoder, models/flops.py and tests/reference.py handle it.")
    assert set(ONE_SEQUENCE_FIELDS) <= {f.name for f in fields(LayerPolicy)}, "ONE_SEQUENCE_FIELDS names a field that is gone"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_fast_path_choice(c):
    assert runs_as_one_sequence(DENSE)
    assert runs_as_one_sequence(replace(DENSE, **{c.field: c.value})) is c.fast


def test_a_new_field_turns_the_fast_path_off():
    @dataclass(frozen=True)
    class WithNewField(LayerPolicy):
        new_knob: int = 0

    assert runs_as_one_sequence(WithNewField())
    assert not runs_as_one_sequence(WithNewField(new_knob=1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLLM.from_config(tiny_config(text_layers=LAYERS, image_size=32)).eval()  # 8 x 8 patch grid, 4 heads over 2 K/V heads


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_flops_model_counts_it(c, model):
    base, changed = plans(c)
    for plan in (base, changed):
        plan.validate(model.text_config.num_attention_heads)
    shape = Shape.from_hf(model.text_config)
    n_visual = model.config.num_image_tokens
    same = plan_terms(shape, base, n_visual, 10)[0] == plan_terms(shape, changed, n_visual, 10)[0]
    neutral = (c.field, c.value) in FLOPS_NEUTRAL
    assert same == neutral, (f"{c.id}: the FLOPs terms {'did not change' if same else 'changed'}; "
                             f"{'count it in models/flops.py' if same else 'drop it from FLOPS_NEUTRAL'}")


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_masked_reference_and_engine_honour_it(c, model):
    base, changed = plans(c)
    input_ids, mask, pixels = image_batch(model.config, batch=2, pad_left=[0, 2], suffix=5)
    text = mask.bool() & (input_ids != model.config.image_token_id)
    model.set_plan(base)
    want_base = reference_logits(model, input_ids, mask, pixels)
    model.set_plan(changed)
    for block in model.xattn.values():  # zero gates would make a gated block an identity
        torch.nn.init.normal_(block.attn_gate, std=1.0)
        torch.nn.init.normal_(block.mlp_gate, std=1.0)
    for router in model.routers.values():  # zero-initialised routers tie every score (the earliest tokens enter)
        torch.nn.init.normal_(router.weight, std=0.1)
    want = reference_logits(model, input_ids, mask, pixels)
    with torch.no_grad():
        got = model(input_ids, mask, pixels, logits="all").logits
    model.set_plan(Plan.dense(LAYERS))
    assert (want - want_base)[text].abs().max().item() > 1e-4, f"{c.id}: tests/reference.py ignores it"
    assert (got - want)[text].abs().max().item() <= 1e-5, f"{c.id}: the engine differs from the masked reference"
