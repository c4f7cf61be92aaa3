"""What lets training run anywhere: strategies (DDP, DeepSpeed ZeRO, FSDP2), parameter sharding,
atomic checkpoint I/O, resume and Slurm preemption. Imports models/ and data/, never the job."""
