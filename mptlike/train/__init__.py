"""Training: the Hydra config, the run skeleton, the loop on Lightning Fabric and its components.

Entry points: `mptlike-train` / `python -m mptlike.train` (mptlike.train.cli.main). Read in this
order: cli.py (arguments) -> config.py (schema) -> plan.py (validation) -> run.py (the steps around
the loop, both backends) -> loop.py (fit: the loop). Components, each with one job: checkpoint.py
(Checkpointer), guard.py (NonFiniteGuard), throughput.py (ThroughputMeter), loggers.py, signals.py
(Preemption), evaluate.py, export.py, optim.py, schedule.py; layout.py names the run folder's files.
"""
