"""Local lmms-eval tasks in the formats of real benchmarks, built from data/synthetic.py (synthetic.py)."""
