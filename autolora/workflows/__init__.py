"""The library code of each job: pre-training, sweeps, the demo, reports."""
