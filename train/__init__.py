"""Training: the job (`python -m train`: run.py, builders.py, module.py and the config objects it
is made of), its infrastructure (`train.infra`) and the tools around it (`train.tools`)."""
