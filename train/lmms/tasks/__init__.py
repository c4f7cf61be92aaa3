"""Local lmms-eval tasks: real benchmarks' formats over data/synthetic.py (synthetic.py) or over LLaVA-format shards (shards.py)."""
