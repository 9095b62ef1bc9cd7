"""One process supervisor: start child processes, watch them, restart them with backoff, drain them
on a stop signal and stop them in reverse order.

`localq worker` (ops/launcher.py: one Celery worker per GPU), `localq up` (ops/up.py: the worker and
the API) and the integration tests and benchmarks (ops/stack.py) all run their processes through it,
so a worker behaves the same under each of them.

What happens when a child exits on its own is its program's `on_exit`:

    RESTART  started again with the same command line and environment after 1 s, then 2, 4, ...
             up to 30 s for one that keeps failing (`Backoff`); the delay starts again from 1 s
             once it has run for 60 s. Leftover processes of its group are killed first, so an
             orphaned pool process never runs a job that is being redelivered.
    FATAL    `supervise()` raises `ChildExited` (the caller stops everything).
    LEAVE    nothing: the caller looks after it (tests that kill a worker on purpose).

Stopping: programs are stopped group by group, the group added last first (`localq up` adds the
worker, then the API: the API stops first, then the worker). Every running member of a group gets
SIGTERM (Celery's warm shutdown, gunicorn's graceful stop) and up to its `stop_timeout` to exit,
then SIGKILL. A stop request during a stop hurries it: SIGQUIT (Celery's cold shutdown, where
running jobs go back on the queue through late acks; gunicorn's quick stop), then SIGKILL
`force_timeout` seconds later. Each child leads its own process group (a terminal's Ctrl-C reaches
the supervisor alone, which then stops the children in order) and is started with
PR_SET_PDEATHSIG, so a supervisor killed outright takes its children with it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ops.redis_server import child_preexec

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESTART, FATAL, LEAVE = "restart", "fatal", "leave"
RESTART_INITIAL = 1.0
RESTART_CAP = 30.0
RESTART_RESET_AFTER = 60.0
POLL_INTERVAL = 0.2
FORCE_STOP_TIMEOUT = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ChildExited(Exception):
    """A FATAL program ended on its own."""


@dataclass(frozen=True)
class Program:
    """One child process to run: what to run, in which environment, and what to do when it ends.

    `log`: a file its output is appended to; else its lines are relayed to the supervisor's output,
    each prefixed with `name | ` (`relay=True`), or it writes straight to the supervisor's stderr."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    on_exit: str = RESTART
    group: str = ""  # programs of one group stop together; empty: a group of its own
    stop_timeout: float | None = None  # None: the supervisor's
    log: Path | None = None
    relay: bool = True
    title: str = ""  # how log lines call it (a worker's node name); empty: `name`

    @property
    def stop_group(self) -> str:
        return self.group or self.name


class Backoff:
    """Restart delays: `initial`, doubling up to `cap`; back to `initial` after `reset_after` s up."""

    def __init__(self, initial: float = RESTART_INITIAL, cap: float = RESTART_CAP,
                 reset_after: float = RESTART_RESET_AFTER):
        self.initial, self.cap, self.reset_after = initial, cap, reset_after
        self.delay = 0.0  # the last delay given; 0 before the first

    def next_delay(self, uptime: float) -> float:
        """The delay before restarting a child that ran for `uptime` seconds."""
        if not self.delay or uptime >= self.reset_after:
            self.delay = self.initial
        else:
            self.delay = min(self.delay * 2, self.cap)
        return self.delay


@dataclass
class Child:
    """One supervised program and its current process (None while it waits to restart)."""

    program: Program
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    starts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    relay: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.program.name

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Run `programs` (more with `add`), keep them running, stop them in reverse order."""

    def __init__(
        self,
        programs: Iterable[Program] = (),
        *,
        stop_timeout: float = 30.0,
        cwd: Path = REPO_ROOT,
        output: Callable[[bytes], None] | None = None,
        poll_interval: float = POLL_INTERVAL,
        force_timeout: float = FORCE_STOP_TIMEOUT,
        backoff: Callable[[], Backoff] = Backoff,
        clock: Callable[[], float] = time.monotonic,
        announce: Callable[[Child], None] | None = None,
    ):
        """`announce(child)` is called as a running child is asked to stop (a line for the user)."""
        self.stop_timeout = stop_timeout
        self.cwd = cwd
        self.output = output or write_stderr
        self.poll_interval = poll_interval
        self.force_timeout = force_timeout
        self.clock = clock
        self.announce = announce
        self._new_backoff = backoff
        self.children: list[Child] = []
        self.signals = 0  # stop requests seen
        self.stopping = False
        self._output_lock = threading.Lock()
        for program in programs:
            self.children.append(Child(program, backoff=backoff()))

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until a stop signal, then stop everything; the exit status
        (0; 1 when a FATAL program ended on its own)."""
        previous = {signum: signal.signal(signum, self.request_stop) for signum in STOP_SIGNALS}
        try:
            self.start()
            while not self.signals:
                self.supervise()
                time.sleep(self.poll_interval)
            log.info("stopping %d process(es)", sum(child.running for child in self.children))
            return 0
        except ChildExited as exc:
            log.error("%s; stopping everything", exc)
            return 1
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def request_stop(self, signum=None, frame=None) -> None:
        """Signal handler: the first call ends `run`'s loop, a further one hurries the stop along."""
        self.signals += 1

    def start(self) -> None:
        for child in self.children:
            if child.process is None:
                self._spawn(child)

    def add(self, program: Program) -> Child:
        """Start one more program now (a name already running is refused)."""
        if any(child.name == program.name for child in self.children):
            raise ValueError(f"{program.name} is already supervised")
        child = Child(program, backoff=self._new_backoff())
        self.children.append(child)
        self._spawn(child)
        return child

    def child(self, name: str) -> Child:
        return next(child for child in self.children if child.name == name)

    def supervise(self) -> None:
        """Notice children that exited: restart those due (RESTART), raise `ChildExited` (FATAL)."""
        if self.stopping:
            return
        now = self.clock()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is not None and child.program.on_exit != LEAVE:
                if child.program.on_exit == FATAL:
                    raise ChildExited(f"the {child.name} exited unexpectedly (status {process.returncode})")
                self._reap(child)
                uptime = now - child.started_at
                delay = child.backoff.next_delay(uptime)
                child.restart_at = now + delay
                log.warning("%s (pid %d) %s after %.0f s; restarting it in %.0f s", _described(child),
                            process.pid, exit_text(process.returncode), uptime, delay)
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every group, the last added first: SIGTERM, then SIGKILL after its stop timeout."""
        if self.stopping:
            return
        self.stopping = True
        groups: dict[str, list[Child]] = {}
        for child in self.children:
            groups.setdefault(child.program.stop_group, []).append(child)
        for members in reversed(list(groups.values())):
            self._stop_children(members, signal.SIGTERM)
        log.info("every process stopped")

    def stop_one(self, name: str, signum: int = signal.SIGTERM, timeout: float | None = None) -> None:
        """Stop one child with `signum` (SIGKILL after `timeout`) and forget it."""
        child = self.child(name)
        self._stop_children([child], signum, timeout)
        self.children.remove(child)

    def _stop_children(self, members: list[Child], signum: int, timeout: float | None = None) -> None:
        for child in members:
            child.restart_at = None
            if child.running:
                if self.announce is not None:
                    self.announce(child)
                _signal(child.process, signum)
        started = self.clock()
        signals_at_stop, hurried_at = self.signals, None
        while True:
            for child in members:
                if child.process is not None and not child.running:
                    self._reap(child)
            running = [child for child in members if child.running]
            if not running:
                return
            now = self.clock()
            if hurried_at is None and self.signals > signals_at_stop:
                log.warning("stopping now: SIGQUIT to %s", ", ".join(_described(child) for child in running))
                for child in running:
                    _signal(child.process, signal.SIGQUIT)
                hurried_at = now
            for child in running:
                limit = timeout if timeout is not None else child.program.stop_timeout
                limit = self.stop_timeout if limit is None else limit
                if now - started > limit or (hurried_at is not None and now - hurried_at > self.force_timeout):
                    log.warning("%s (pid %d) did not stop in time; killing it", _described(child),
                                child.process.pid)
                    kill_group(child.process.pid)
                    child.process.wait()
            time.sleep(self.poll_interval)

    # -- one child -----------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        program = child.program
        child.restart_at = None
        child.started_at = self.clock()
        log_file = _open_log(program.log) if program.log is not None else None
        try:
            process = subprocess.Popen(
                list(program.argv),
                env=dict(program.env),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file or (subprocess.PIPE if program.relay else _stderr_fd()),
                stderr=subprocess.STDOUT,
                process_group=0,  # its own group: also holds what it starts (a worker's pool processes)
                preexec_fn=child_preexec(),  # SIGTERM when the supervisor dies
            )
        except OSError as exc:
            delay = child.backoff.next_delay(0.0)
            child.restart_at = self.clock() + delay
            log.error("cannot start %s: %s; trying again in %.0f s", program.name, exc, delay)
            return
        finally:
            if log_file is not None:
                log_file.close()
        child.process = process
        child.starts += 1
        if child.starts > 1:
            log.warning("restarted %s (pid %d)", _described(child), process.pid)
        else:
            log.info("started %s (pid %d)", _described(child), process.pid)
        if process.stdout is not None:
            child.relay = threading.Thread(target=self._relay, args=(process.stdout, program.name),
                                           name=f"relay-{program.name}", daemon=True)
            child.relay.start()

    def _reap(self, child: Child) -> None:
        """After a child's main process ended: kill what is left of its group, finish its output."""
        process, child.process = child.process, None
        process.wait()
        kill_group(process.pid)  # leftover pool processes; nothing reuses the id while they live
        if child.relay is not None:
            child.relay.join(timeout=2.0)
            child.relay = None

    def _relay(self, stream: IO[bytes], label: str) -> None:
        prefix = f"{label} | ".encode()
        with stream:
            for line in iter(stream.readline, b""):
                if not line.endswith(b"\n"):
                    line += b"\n"
                with self._output_lock:
                    self.output(prefix + line)


def _described(child: Child) -> str:
    return child.program.title or child.name


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr (pytest capture, IDEs)
        return None


def write_stderr(data: bytes) -> None:
    try:
        while data:
            written = os.write(2, data)
            data = data[written:]
    except OSError:
        pass


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"
