"""The model families the engine runs, one module each; importing this package registers them
(`models.family.FAMILIES`, by `model.config.family`)."""

from . import internvl, llava, llava_next, mobilevlm, qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl  # noqa: F401  (registration)
