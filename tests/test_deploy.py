"""The systemd unit in deploy/: a valid unit whose command line is one the CLI accepts."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "stream-service.service"
CLI = [sys.executable, "-m", "stream_service.cli"]


def exec_start() -> list[str]:
    line = next(x for x in UNIT.read_text().splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_the_unit_runs_the_pipeline_with_options_the_cli_knows() -> None:
    program, command, *options = exec_start()
    assert program.endswith("/stream-service") and command == "run"
    flags = [o for o in options if o.startswith("--")]
    assert flags == ["--config", "--run-dir", "--summary-every"]
    help_text = subprocess.run([*CLI, "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    assert all(flag in help_text for flag in flags), help_text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    program = exec_start()[0]
    here = shutil.which("stream-service") or str(Path(sys.executable).parent / "stream-service")
    if not Path(here).exists():
        pytest.skip("the stream-service entry point is not installed in this environment")
    unit = tmp_path / "stream-service.service"
    unit.write_text(UNIT.read_text().replace(program, here))  # an executable that exists on this machine
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "stream-service.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
