"""Each preset in conf/arch/ spells out every knob of its builder (so sweeps and readers see them all)
with the builder's default (models/methods.py), so `arch=<name>` and the builder called without knobs
build the same plan. A deliberate difference would be listed in DIFFERENT with its reason; there is none.

Keep fractions are written with ten decimals in YAML (0.3333333333 for 1/3) and compared to 1e-9."""

import inspect
import math
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from models.methods import PLAN_BUILDERS, knobs_of
from models.plan import PreSelect

CONF = Path(__file__).resolve().parents[1] / "conf" / "arch"
PRESETS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(CONF.glob("*.yaml")) if p.stem != "file"}  # file: a pointer
DIFFERENT: dict[tuple[str, str], str] = {}  # (preset, knob) -> why the preset departs from the builder's default


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
    return a == b


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_knobs_equal_builder_defaults(name):
    arch = PRESETS[name]
    if "pre_llm" in arch:  # a raw pre-LLM step (cls_knee): its keys are PreSelect's, at their defaults
        defaults = {f.name: f.default for f in fields(PreSelect)}
        assert set(arch["pre_llm"]) <= set(defaults)
        assert all(same(v, defaults[k]) for k, v in arch["pre_llm"].items()), arch["pre_llm"]
        return
    for method, knobs in (arch.get("methods") or {}).items():
        builder = PLAN_BUILDERS[method]
        params = inspect.signature(builder).parameters
        assert set(knobs) == set(knobs_of(builder)), f"conf/arch/{name}.yaml lists {sorted(knobs)}, {method}() takes {knobs_of(builder)}"
        for knob, value in knobs.items():
            default = params[knob].default
            if (name, knob) in DIFFERENT:
                assert not same(value, default), f"{name}.{knob} now equals the default: drop it from DIFFERENT"
                continue
            assert same(value, default), f"conf/arch/{name}.yaml: {knob}={value!r}, but {method}() defaults to {default!r}"
