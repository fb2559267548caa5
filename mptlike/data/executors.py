"""Where prep's work units are tokenized: this process, a local process pool, or a Ray cluster.

Every executor runs the same function on the same units and each unit writes its own file in the
output folder's work area, so which one ran (and with how many workers) never shows in the output:
the parent reads the unit files back in order. An executor only has to `submit` a unit, hand back
its record from `result`, and stop its workers in `close`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from mptlike.data import units
from mptlike.data.tokenizer import Tokenizer
from mptlike.errors import MptlikeError, short_error

log = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install 'mptlike[ray]'"


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class InProcess:
    """Tokenize in this process when `result` asks, several queued units at a time.

    Consecutive units go through the tokenizer together, up to GROUP_BYTES of input (small units
    alone would give its threads too few documents per call); each still gets its own file.
    """

    GROUP_BYTES = 1 << 24
    window = 64  # units queued ahead: only their descriptions, nothing is read before `result`

    def __init__(self, tok: Tokenizer, digest: str, work_dir: Path) -> None:
        self.tok, self.digest, self.work_dir = tok, digest, work_dir
        self.queue: list[units.Unit] = []
        self.records: dict[str, dict] = {}

    def submit(self, unit: units.Unit) -> units.Unit:
        self.queue.append(unit)
        return unit

    def result(self, handle: units.Unit) -> dict:
        if handle.key not in self.records:
            # Results are asked for in submission order, so `handle` heads the queue.
            group, weight = [], 0
            while self.queue and (not group or weight + self.queue[0].weight <= self.GROUP_BYTES):
                group.append(self.queue.pop(0))
                weight += group[-1].weight
            for unit, record in zip(group, units.tokenize_units(group, self.work_dir, self.tok, self.digest)):
                self.records[unit.key] = record
        return self.records.pop(handle.key)

    def close(self, ok: bool) -> None:
        pass


class ProcessPool:
    """A pool of `workers` local processes (forkserver, else spawn), each loading the tokenizer once."""

    def __init__(self, payload: units.TokenizerPayload, work_dir: Path, workers: int) -> None:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            # Imported once in the fork server, not once per worker.
            ctx.set_forkserver_preload(["mptlike.data.units"])
        # Each worker gets its share of the cores for the tokenizers library's own threads.
        threads = max(1, local_cores() // workers)
        self.pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=units.init_pool_worker, initargs=(payload, threads)
        )
        self.window = 2 * workers
        self.work_dir, self.digest = str(work_dir), payload.digest

    def submit(self, unit: units.Unit) -> Future:
        return self.pool.submit(units.pool_task, unit, self.work_dir, self.digest)

    def result(self, handle: Future) -> dict:
        try:
            return handle.result()
        except BrokenProcessPool:
            raise MptlikeError(
                "A mptlike-prep worker process died (killed or out of memory; or prepare() was called from a "
                "script without `if __name__ == '__main__':`); rerun the same command to resume with the finished "
                "work units, with fewer --workers if memory is short."
            ) from None

    def close(self, ok: bool) -> None:
        if ok:
            self.pool.shutdown(wait=True)
            return
        # Do not let units in flight finish: their files are complete or absent either way. But wait
        # for the workers to be gone, so that nothing writes into a work area the caller may remove.
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(10)


def ray_task(unit: units.Unit, work_dir: str, digest: str, payload_box: list) -> dict:
    """A unit as a Ray task; the tokenizer is fetched and built once per Ray worker process."""
    tok = units.cached_worker_tokenizer(digest)
    if tok is None:
        import ray

        # One task per CPU: the tokenizers library's own thread pool would only oversubscribe it.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        tok = units.worker_tokenizer(ray.get(payload_box[0]))
    return units.tokenize_unit(unit, Path(work_dir), tok, digest)


def ray_missing_error() -> MptlikeError:
    return MptlikeError(f"--executor ray needs Ray, which is not installed; {RAY_INSTALL_HINT}.")


class RayExecutor:
    """Units as Ray tasks on a cluster (`address`) or a local Ray started here."""

    def __init__(self, payload: units.TokenizerPayload, work_dir: Path, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise ray_missing_error() from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            try:
                if address:
                    ray.init(address=address, include_dashboard=False)
                else:
                    ray.init(num_cpus=workers or None, include_dashboard=False)
            except Exception as e:  # connection and start-up failures come as several types
                raise MptlikeError(
                    f"Could not start or reach {where} ({short_error(e)}); check --ray-address "
                    "(e.g. ray://head:10001 or auto) or run without --executor ray."
                ) from None
            self.started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        self.window = 2 * self.workers
        self.box = [ray.put(payload)]  # in a list, so tasks get the reference and fetch it only once
        self.task = ray.remote(num_cpus=1)(ray_task)
        self.work_dir, self.digest = str(work_dir), payload.digest
        self.pending: set = set()
        log.info("Ray: %d CPUs in the cluster, up to %d units at a time.", cpus, self.workers)

    def submit(self, unit: units.Unit):
        ref = self.task.remote(unit, self.work_dir, self.digest, self.box)
        self.pending.add(ref)
        return ref

    def result(self, handle) -> dict:
        self.pending.discard(handle)
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, MptlikeError):
                raise MptlikeError(str(cause)) from None
            if isinstance(cause, ModuleNotFoundError) and "mptlike" in str(cause):
                raise MptlikeError(
                    "Ray workers cannot import mptlike; install the same mptlike on every node of the cluster."
                ) from None
            raise

    def close(self, ok: bool) -> None:
        if not ok and self.pending:
            refs = list(self.pending)
            for ref in refs:
                self.ray.cancel(ref, force=True)
            # Cancelled tasks end at once; wait so that none writes into a work area being removed.
            self.ray.wait(refs, num_returns=len(refs), timeout=30)
        self.pending.clear()
        if self.started:
            self.ray.shutdown()
