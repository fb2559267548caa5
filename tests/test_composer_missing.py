"""Without MosaicML Composer installed, trainer=composer fails at once with one line saying how to install it."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("composer") is not None, reason="Composer is installed in this environment"
)


def test_trainer_composer_without_composer_exits_2_with_one_line_naming_the_install(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "MPTLIKE_DATA": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, "-m", "mptlike.train", "trainer=composer", f"run_dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "make composer-env" in lines[0] and "pip install 'mptlike[composer]'" in lines[0]
    # It failed before anything was prepared or written.
    assert not run_dir.exists() and not (tmp_path / "data").exists()
