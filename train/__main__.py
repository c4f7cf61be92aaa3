"""`python -m train [overrides]` runs the training job (conf/train.yaml);
`python -m train evaluate [overrides]` runs it without training (conf/evaluate.yaml);
`python -m train <tool> [overrides]` runs one of the tools below (each also `python -m train.tools.<tool>`).

Hydra overrides always contain `=` (or start with `-`), so a bare first word names a job or a tool.
Plans combine as `arch=vica+pdrop` (the form lmms-eval's model_args also take) or Hydra's list
`arch='[vica,pdrop]'`; the first is rewritten to the second before Hydra reads the command line.
Bad input (a wrong key or value, a missing file) exits 2 with one paragraph (train/errors.py).
"""

import importlib
import re
import sys

JOBS = {"evaluate": "evaluate a trained model under any plan, no training (the job with conf/evaluate.yaml)"}
TOOLS = {
    "flops": "analytic FLOPs of a plan (JSON)",
    "bench": "prefill / training step / decode timings of plans against dense (JSON + results file)",
    "bench_dispatch": "aten ops, host syncs and decode graph breaks per family and plan, against transformers (JSON + results file)",
    "bench_decode": "decode tokens/s per plan and batch, eager and compiled, against transformers' generate (JSON + results file)",
    "bench_strategies": "real multi-rank training per strategy: per-rank memory and step time",
    "bench_packing": "padded, length-grouped and packed training steps on a LLaVA-665k-like length mix",
    "memory": "analytic per-GPU training memory per strategy",
    "analyze": "calibrate a model: layer scores and plan files (ShortV, VTW, ViCA, YOPO, VisiPruner)",
    "pareto": "aggregate a sweep: efficiency-versus-accuracy table and plots",
    "time_to_accuracy": "val/acc against training wall-clock of runs evaluated along the way",
    "convert_checkpoint": "a checkpoint directory in the other layout: llava-hf <-> the original LLaVA layout",
}


def plan_sums_as_lists(args: list[str]) -> list[str]:
    """`arch=vica+pdrop` -> `arch=[vica,pdrop]` (also each choice of a sweep, `arch=vica+pdrop,dense`)."""

    def as_list(choice: str) -> str:
        return f"[{','.join(choice.split('+'))}]" if "+" in choice and not choice.startswith("[") else choice

    out = []
    for arg in args:
        match = re.fullmatch(r"(arch=)(.+)", arg)
        if match and "+" in match[2]:
            choices = re.split(r",(?![^\[]*\])", match[2])  # commas outside [...] separate sweep choices
            arg = match[1] + ",".join(as_list(c) for c in choices)
        out.append(arg)
    return out


def run_job() -> None:
    from . import errors
    from .run import main as job

    try:
        job()
    except SystemExit as e:
        if e.code == 1 and not errors.job_started():  # Hydra refused the command line or config (it printed why)
            raise SystemExit(errors.EXIT_BAD_INPUT) from None
        raise


def main() -> None:
    from .builders import register_resolvers
    from .errors import exit_on_input_error

    register_resolvers()
    sys.argv[1:] = plan_sums_as_lists(sys.argv[1:])
    if len(sys.argv) > 1 and sys.argv[1] in JOBS:
        sys.argv[1:2] = [f"--config-name={sys.argv[1]}"]  # the job, composed from another primary config
        run_job()
    elif len(sys.argv) > 1 and sys.argv[1] in TOOLS:
        tool = sys.argv.pop(1)
        sys.argv[0] = f"python -m train {tool}"
        with exit_on_input_error():
            importlib.import_module(f"train.tools.{tool}").main()
    elif len(sys.argv) > 1 and sys.argv[1] in ("tools", "--tools"):
        print("\n".join(f"python -m train {name:<17} {what}" for name, what in {**JOBS, **TOOLS}.items()))
    else:
        run_job()


if __name__ == "__main__":
    main()
