"""Run a check in 2 CPU processes joined by gloo (torch.multiprocessing), for FSDP2 tests."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _in_process_group(rank, init_file, check, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    check(rank, *args)  # returns after its models are gone: nothing holds the group at shutdown
    dist.barrier()  # a rank that tears down gloo while the other still talks aborts it
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: now and then a gloo thread still being destroyed
    # there aborts the process ("terminate called without an active exception") after a check passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(check, tmp_path, *args):
    """`check(rank, *args)` on ranks 0 and 1 (a module-level function); an assertion fails the test."""
    mp.spawn(_in_process_group, args=(str(tmp_path / "init"), check, *args), nprocs=WORLD, join=True)
