"""Bridge to lmms-eval (EvolvingLMMs-Lab/lmms-eval 0.7): the `efficient_mllm` model (model.py), the
evaluation processor read from a checkpoint (processor.py), the files an export needs to be evaluated
like it was trained (export.write_eval_files) and `run.run_lmms_tasks` for in-process evaluation.
Only model.py, run.py and entry_point.py import lmms_eval; the rest works without it."""
