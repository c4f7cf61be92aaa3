"""The tools around training (`python -m train <tool>`): FLOPs, benchmarks, memory estimates,
calibration analyses and sweep aggregation. They build what they need through `train.builders`
and never import the job's entry point (`train.run`)."""
