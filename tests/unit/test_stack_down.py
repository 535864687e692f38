"""`make down` (scripts/stack.sh down --all) stops every local stack `up` started, wherever
its RUN_DIR is (`leukofed simulate --keep` leaves one in .run/simulate/run), and signals no
process that is not the one a stack started. Stand-in processes (`sleep` in a session of
its own, as `start` makes them), no services started."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.aggregator.simulate import stop_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:  # whatever happened, nothing left behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def fake_stack(run_dir: Path, sleepers: list[subprocess.Popen], names=("redis", "mlflow"),
               own_session: bool = True) -> list[subprocess.Popen]:
    """Processes recorded in run_dir/pids as stack.sh's `start` records them."""
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    started = []
    for name in names:
        proc = subprocess.Popen(["sleep", "300"], start_new_session=own_session)
        (run_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
        sleepers.append(proc)
        started.append(proc)
    return started


def stack(*args: str, run_dir: Path, stacks_file: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUN_DIR": str(run_dir), "STACKS_FILE": str(stacks_file)}
    return subprocess.run(["bash", "scripts/stack.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def stopped(proc: subprocess.Popen) -> bool:
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_down_all_stops_every_stack_up_started(tmp_path: Path, sleepers) -> None:
    main = tmp_path / "run"  # the default stack (.run)
    simulate = main / "simulate" / "run"  # inside it, as `leukofed simulate` leaves one
    elsewhere = tmp_path / "elsewhere" / "run"  # another RUN_DIR, listed by `up`
    stacks_file = tmp_path / "stacks"
    stacks_file.write_text(f"{elsewhere}\n{tmp_path / 'gone'}\n")
    procs = [*fake_stack(main, sleepers), *fake_stack(simulate, sleepers, ("virtual-0",)),
             *fake_stack(elsewhere, sleepers, ("aggregator", "client-a"))]

    # A plain `down` is this RUN_DIR's stack only.
    done = stack("down", run_dir=elsewhere, stacks_file=stacks_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(stopped(p) for p in procs[3:])
    assert all(p.poll() is None for p in procs[:3])
    assert str(elsewhere) not in stacks_file.read_text()  # forgotten once down

    stacks_file.write_text(f"{elsewhere}\n")
    fake_stack(elsewhere, sleepers, ("inference",))
    done = stack("down", "--all", run_dir=main, stacks_file=stacks_file)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(stopped(p) for p in sleepers), done.stdout
    for run_dir in (main, simulate, elsewhere):
        assert f"stopping the stack in {run_dir}" in done.stdout
        assert not list((run_dir / "pids").glob("*.pid"))
    assert stacks_file.read_text().strip() == ""
    assert stack("down", "--bogus", run_dir=main, stacks_file=stacks_file).returncode == 2


def test_down_signals_no_process_it_did_not_start(tmp_path: Path, sleepers) -> None:
    # A recorded pid that leads no session of its own is someone else's process now.
    run_dir = tmp_path / "run"
    (other,) = fake_stack(run_dir, sleepers, ("redis",), own_session=False)
    done = stack("down", "--all", run_dir=run_dir, stacks_file=tmp_path / "stacks")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no longer the process this stack started; not signalled" in done.stdout
    assert other.poll() is None
    assert not (run_dir / "pids" / "redis.pid").exists()


def test_simulate_keep_prints_the_one_command_that_stops_its_stack(
        tmp_path: Path, sleepers) -> None:
    run_dir = tmp_path / "simulate dir" / "run"  # a space: the command quotes it
    procs = fake_stack(run_dir, sleepers, ("aggregator", "virtual-0"))
    command = stop_command(run_dir)
    assert command.endswith("/scripts/stack.sh down") and "RUN_DIR=" in command
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(stopped(p) for p in procs)
