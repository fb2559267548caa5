"""Training: the Hydra config, a Lightning module with FSDP2, optimizers, schedules, checkpoints.

Entry points: `mptlike-train` / `python -m mptlike.train` (mptlike.train.cli.main).
"""
