"""What runs a method: the DeepSpeed strategy, checkpoints, resume, interrupts, the NaN/inf policy, tracking,
optimizers and configs. Never imports a method."""
