"""`mptlike-train` with parallel.float8 switched on past the plan's GPU check, for the tests only: on CPU the layers
run on torch's CPU float8 matmul, so the loop's float8 wiring (FSDP2's float8 all-gather, the scales after each
optimizer step and after a load, checkpoints, the export) is tested without a GPU.

    python tests/float8_cpu_run.py OVERRIDES...                                         # one process
    python -m torch.distributed.run --nproc_per_node=2 tests/float8_cpu_run.py OVERRIDES...
"""

import dataclasses
import sys

from mptlike.train.config import compose_config, to_train_config
from mptlike.train.plan import build_plan
from mptlike.train.run import run

if __name__ == "__main__":
    plan = build_plan(to_train_config(compose_config(sys.argv[1:])))
    run(dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, float8=True)))
