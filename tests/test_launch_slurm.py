"""launch/slurm.sbatch at the time limit, without SLURM: stub srun, scancel and scontrol on PATH.

The stub srun runs one "training process" that, like mptlike.train, exits 3 ("preempted") a moment
after SIGTERM; the stub scancel delivers its signal to that process, as slurmd would. Every stub
appends to one log, so the log's order is the order in which things happened.
"""

import os
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm.sbatch"
JOB_ID = "4242"

STUBS = {
    "srun": """
        echo "srun $*" >> "$STUB_LOG"
        bash -c '
            trap "echo train got TERM >> \\"\\$STUB_LOG\\"; sleep 0.3; \\
                  echo train exits \\$STUB_EXIT >> \\"\\$STUB_LOG\\"; exit \\$STUB_EXIT" TERM
            echo $$ > "$STUB_DIR/train.pid"
            if [ -n "$STUB_ENDS_ALONE" ]; then sleep 0.5; exit "$STUB_ENDS_ALONE"; fi
            while :; do sleep 0.05; done
        ' &
        wait $!
    """,
    "scancel": """
        echo "scancel $*" >> "$STUB_LOG"
        for arg in "$@"; do
            case "$arg" in --signal=*) kill -s "${arg#--signal=}" "$(cat "$STUB_DIR/train.pid")" ;; esac
        done
    """,
    "scontrol": """
        echo "scontrol $*" >> "$STUB_LOG"
        if [ "$1 $2" = "show hostnames" ]; then echo node001; echo node002; fi
    """,
}


@dataclass
class Run:
    returncode: int
    log: list[str]

    def index(self, prefix: str) -> int:
        hits = [i for i, line in enumerate(self.log) if line.startswith(prefix)]
        assert hits, f"no log line starts with {prefix!r}:\n" + "\n".join(self.log)
        return hits[0]


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds} s"
        time.sleep(0.05)


def run_script(tmp: Path, *, stub_exit: int = 3, send_usr1: bool = True, ends_alone: str = "") -> Run:
    """Start the script; send it USR1 as `--signal=B:USR1@300` would (the stub training process then
    exits `stub_exit` after SIGTERM), or let the stub end by itself with `ends_alone`; wait for the end."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
        stub.chmod(0o755)
    log = tmp / "log"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp),
        "STUB_LOG": str(log),
        "STUB_DIR": str(tmp),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_NNODES": "2",
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_GPUS_ON_NODE": "8",
        "STUB_EXIT": str(stub_exit),
        "STUB_ENDS_ALONE": ends_alone,
    }
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "run_dir=/shared/runs/x"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so that a hung run can be killed whole
    )
    try:
        _wait_for(tmp / "train.pid", seconds=10)
        if send_usr1:
            proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=10)
    except (AssertionError, subprocess.TimeoutExpired) as e:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        lines = log.read_text() if log.exists() else ""
        pytest.fail(f"{e}\nscript output:\n{output.decode()}\nstub log:\n{lines}")
    return Run(proc.returncode, log.read_text().splitlines())


@pytest.fixture(scope="module")
def time_limit_run(tmp_path_factory) -> Run:
    return run_script(tmp_path_factory.mktemp("slurm"))


def test_time_limit_signal_reaches_the_training_process(time_limit_run):
    scancel = time_limit_run.log[time_limit_run.index("scancel")]
    assert scancel == f"scancel --signal=TERM {JOB_ID}"  # the job's steps, not the batch shell
    time_limit_run.index("train got TERM")


def test_requeue_only_after_the_training_process_exited(time_limit_run):
    assert time_limit_run.index("train exits 3") < time_limit_run.index(f"scontrol requeue {JOB_ID}")


def test_script_exits_with_the_step_status(time_limit_run):
    assert time_limit_run.returncode == 3


def test_srun_gets_cpus_per_task(time_limit_run):
    srun = time_limit_run.log[time_limit_run.index("srun")].split()
    assert "--cpus-per-task=64" in srun


@pytest.mark.parametrize("status, requeued", [
    (1, True),    # what torchrun returns when its workers exited 3 after its forwarded SIGTERM
    (137, True),  # a process killed (KillWait ran out): the newest complete checkpoint is still there
    (0, False),   # training finished within the last minutes: nothing to continue
    (2, False),   # a bad config would fail the same way again
])
def test_requeue_after_the_time_limit_signal_depends_on_the_step_status(tmp_path, status, requeued):
    run = run_script(tmp_path, stub_exit=status)
    assert run.returncode == status
    assert any(line == f"scontrol requeue {JOB_ID}" for line in run.log) is requeued


def test_a_step_that_ends_without_the_time_limit_signal_is_not_requeued(tmp_path):
    run = run_script(tmp_path, send_usr1=False, ends_alone="1")  # a crash, not a time limit
    assert run.returncode == 1
    assert not any(line.startswith(("scancel", "scontrol requeue")) for line in run.log)
