"""What a run folder (run_dir) holds, each name said once.

    config.yaml          the resolved config of the run (credentials blanked)
    metrics.csv          logger=csv: a `step` column and every logged metric
    wandb/, wandb_run_id logger=wandb: W&B's files and the run id a resume continues
    checkpoints/         step-NNNNNNN/ folders (mptlike.train.checkpoint), or Composer's files
    final/               the trained weights, MPTForCausalLM.from_pretrained
    guard_events.jsonl   one row per NaN/inf step the guard handled
    samples.jsonl        debug.log_sample_ids: the global sample indices of every step
    .lock                held (flock) by the run using the folder: pid, host and start time
"""

CONFIG = "config.yaml"
METRICS_CSV = "metrics.csv"
WANDB_ID = "wandb_run_id"
CHECKPOINTS = "checkpoints"
FINAL = "final"
GUARD_EVENTS = "guard_events.jsonl"
SAMPLES_LOG = "samples.jsonl"
LOCK = ".lock"
