"""The process supervisor (ops/supervisor.py) with stand-in processes: what each exit policy does,
the order of a stop, hurrying a stop, stopping one child, and where output goes."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import pytest

from ops.stack import wait_until
from ops.supervisor import FATAL, LEAVE, RESTART, Backoff, ChildExited, Program, Supervisor

# Prints "up NAME", then on SIGTERM appends "stop NAME" to $EVENTS and exits 0 (after $LINGER s);
# on SIGQUIT appends "quit NAME" and exits; with $EXIT_AFTER set it exits with status 3 by itself.
STANDIN = r"""
import os, signal, sys, time
name, events = os.environ["NAME"], os.environ["EVENTS"]
def note(word):
    with open(events, "a") as out:
        out.write(f"{word} {name}\n")
def on_term(*_):
    time.sleep(float(os.environ.get("LINGER", "0")))
    note("stop")
    sys.exit(0)
def on_quit(*_):
    note("quit")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("STUBBORN") else on_term)
signal.signal(signal.SIGQUIT, on_quit)
print("up", name, flush=True)
note("up")
exit_after = os.environ.get("EXIT_AFTER")
if exit_after:
    time.sleep(float(exit_after))
    sys.exit(3)
while True:
    time.sleep(0.05)
"""


class Events:
    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def count(self, line: str) -> int:
        return self.lines().count(line)


@pytest.fixture
def events(tmp_path) -> Events:
    return Events(tmp_path / "events")


def program(name: str, events: Events, on_exit: str = RESTART, group: str = "", **env) -> Program:
    environment = {"NAME": name, "EVENTS": str(events.path), "PYTHONUNBUFFERED": "1", **env}
    return Program(name, [sys.executable, "-c", STANDIN], environment, on_exit, group=group)


def supervisor(*programs: Program, **options) -> Supervisor:
    options = {"poll_interval": 0.02, "backoff": lambda: Backoff(0.05, 0.2, 60.0), "output": lambda data: None,
               **options}
    return Supervisor(programs, **options)


def supervise_until(runner: Supervisor, check, what: str):
    def step():
        runner.supervise()
        return check()

    return wait_until(step, 20, what, interval=0.02)


def test_a_restart_program_is_started_again_after_it_exits(events):
    runner = supervisor(program("w", events, RESTART, EXIT_AFTER="0.1"))
    runner.start()
    try:
        supervise_until(runner, lambda: events.count("up w") >= 3, "three starts")
        assert runner.child("w").starts >= 3
        assert runner.child("w").backoff.delay > 0.05  # the delay grew: it keeps failing
    finally:
        runner.stop()


def test_a_fatal_program_ending_raises_and_a_leave_program_is_left_alone(events):
    runner = supervisor(program("api", events, FATAL, EXIT_AFTER="0.1"), program("w", events, LEAVE, EXIT_AFTER="0"))
    runner.start()
    try:
        def fatal():
            try:
                runner.supervise()
            except ChildExited as exc:
                return exc

        assert str(wait_until(fatal, 20, "the API to exit", 0.02)) == "the api exited unexpectedly (status 3)"
        assert runner.child("w").starts == 1 and runner.child("w").process.poll() == 3  # not restarted, not reaped
    finally:
        runner.stop()


def test_groups_stop_in_reverse_order_members_together(events):
    runner = supervisor(program("w0", events, group="workers"), program("w1", events, group="workers"),
                        program("api", events, LINGER="0.3"))
    runner.start()
    wait_until(lambda: len([line for line in events.lines() if line.startswith("up")]) == 3, 20, "three up")
    announced = []
    runner.announce = lambda child: announced.append(child.name)
    runner.stop()
    stops = [line for line in events.lines() if line.startswith("stop")]
    assert stops[0] == "stop api"  # added last, stopped first, and waited for (it lingers)
    assert sorted(stops[1:]) == ["stop w0", "stop w1"]
    assert announced[0] == "api" and sorted(announced[1:]) == ["w0", "w1"]
    assert not any(child.running for child in runner.children)
    runner.supervise()  # nothing is restarted while (or after) stopping
    assert all(child.process is None for child in runner.children)


def test_a_stop_request_during_a_stop_sends_sigquit(events):
    runner = supervisor(program("w", events, STUBBORN="1"), stop_timeout=30.0)
    runner.start()
    wait_until(lambda: events.count("up w") == 1, 20, "the stand-in")
    threading.Timer(0.3, runner.request_stop).start()
    runner.stop()
    assert events.count("quit w") == 1  # SIGQUIT, not the SIGKILL due at the 30 s stop timeout


def test_a_straggler_is_killed_after_its_stop_timeout(events):
    runner = supervisor(Program("w", [sys.executable, "-c", STANDIN],
                                {"NAME": "w", "EVENTS": str(events.path), "STUBBORN": "1"}, stop_timeout=0.2))
    runner.start()
    wait_until(lambda: events.count("up w") == 1, 20, "the stand-in")
    process = runner.child("w").process
    stopper = threading.Thread(target=runner.stop, daemon=True)
    stopper.start()
    stopper.join(60)  # a hang guard only
    assert not stopper.is_alive()
    assert process.returncode == -signal.SIGKILL and events.lines() == ["up w"]


def test_stop_one_and_add_and_output_to_a_log_file(events, tmp_path):
    runner = supervisor()
    log = tmp_path / "logs" / "w.log"
    child = runner.add(Program("w", [sys.executable, "-c", STANDIN], {"NAME": "w", "EVENTS": str(events.path)},
                               LEAVE, log=log))
    with pytest.raises(ValueError, match="already supervised"):
        runner.add(child.program)
    wait_until(lambda: log.exists() and log.read_text() == "up w\n", 20, "the log line")
    runner.stop_one("w", signal.SIGTERM, timeout=10)
    assert events.lines() == ["up w", "stop w"] and runner.children == []


def test_relayed_output_is_prefixed_with_the_name(events):
    lines = []
    runner = supervisor(program("gpu0", events), output=lines.append)
    runner.start()
    try:
        wait_until(lambda: b"gpu0 | up gpu0\n" in lines, 20, "the relayed line")
    finally:
        runner.stop()


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_run():
    backoff = Backoff(1.0, 4.0, 60.0)
    assert [backoff.next_delay(0) for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    assert backoff.next_delay(61) == 1.0
