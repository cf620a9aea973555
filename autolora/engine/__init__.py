"""The training engine: the loop, the run directory, the runtime (device, seeds, DDP, speed switches), the schedules."""
