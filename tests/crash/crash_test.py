"""kvmem crash test: kill the server with SIGKILL at random moments under
load and check that nothing acknowledged as durable is lost.

Each cycle, on one data dir that outlives every cycle (sessions keep growing):
1. the load generator (loadgen.py, threads of this process) drives the
   sessions of a running kvmem-server, journaling every acknowledgement;
2. after a random time (seeded, --min-kill-s..--max-kill-s) the server is
   killed with SIGKILL while steps are in flight;
3. the server is restarted on the same --data_dir and the checker
   (checker.py) verifies every session against the journal, steps it on from
   where the server says it resumes, and reads every token back (sometimes,
   --recovery-kill, the server is first killed again a moment into such a
   check, and restarted);
4. sometimes (--graceful, seeded) the server is then stopped with SIGTERM,
   which must exit 0 and keep every session exactly where it was, and
   checked again.

A line per cycle, then the result; the exit status is 1 on any violation
(2 when the harness itself could not run). Seeds are printed: --seed S
repeats the kill times, the graceful stops and the data (the data seed is
kept in the journal of a reused --work-dir).

    /usr/bin/python3 tests/crash/crash_test.py --cycles 100
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import checker  # noqa: E402  pylint: disable=wrong-import-position
import loadgen  # noqa: E402  pylint: disable=wrong-import-position

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 120.0


class HarnessError(Exception):
    """The test could not go on (the server would not start, say)."""


class ServerProcess:
    """One run of the kvmem-server binary, its output in a log file."""

    def __init__(self, binary: str, data_dir: str, log_path: str,
                 flags: Sequence[str]) -> None:
        self.log_path = log_path
        self.started = time.monotonic()
        with open(log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(
                    [binary, "--listen=127.0.0.1:0",
                     "--data_dir=" + data_dir, *flags],
                    stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL)
            except OSError as error:
                raise HarnessError("cannot start %s: %s" % (binary,
                                                            error)) from None
        self.address = self._wait_for_start_line()
        self.start_s = time.monotonic() - self.started

    def _wait_for_start_line(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        pattern = re.compile(rb"listening on (127\.0\.0\.1:(\d+))")
        while True:
            with open(self.log_path, "rb") as log:
                match = pattern.search(log.read())
            if match and int(match.group(2)) > 0:
                return match.group(1).decode()
            if time.monotonic() > deadline:
                self.kill()
                raise HarnessError("kvmem-server printed no start line in "
                                   "%.0f s; log %s:\n%s" % (
                                       START_TIMEOUT_S, self.log_path,
                                       self.log_tail()))
            try:
                code = self.proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            raise HarnessError("kvmem-server exited with %d before serving; "
                               "log %s:\n%s" % (code, self.log_path,
                                                self.log_tail()))

    def wait(self, seconds: float) -> Optional[int]:
        """Waits up to `seconds` for the server to exit; its exit code, or
        None while it runs."""
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> Optional[int]:
        """SIGTERM (a graceful stop); the exit code, or None if it did not
        stop within STOP_TIMEOUT_S (it is then killed)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait(STOP_TIMEOUT_S)
        if code is None:
            self.kill()
        return code

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's output."""
        with open(self.log_path, "rb") as log:
            text = log.read().decode(errors="replace")
        return "\n".join("    | " + line
                         for line in text.splitlines()[-lines:])


@dataclasses.dataclass
class Result:
    """What a crash-test run found."""

    cycles: int = 0
    kills: int = 0
    graceful_stops: int = 0
    violations: int = 0
    duration_s: float = 0.0
    seed: int = 0
    data_seed: int = 0
    steps: int = 0
    tokens: int = 0
    violation_lines: list[str] = dataclasses.field(default_factory=list)
    note_lines: list[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    @property
    def passed(self) -> bool:
        """No violation and no harness error."""
        return self.violations == 0 and self.error is None


def kill_during_check(server: ServerProcess, kill_s: float,
                      ctx: loadgen.Context, journal_path: str,
                      start: Callable[[], ServerProcess],
                      report: loadgen.Report) -> ServerProcess:
    """Runs the checker against a freshly restarted server and kills the
    server `kill_s` seconds in (sessions waking, steps of the check in
    flight), then starts it again: a crash during recovery must lose
    nothing either. Returns the new server."""
    state = checker.JournalState.from_records(loadgen.Journal.read(
        journal_path))

    def check() -> None:
        try:
            checker.Checker(ctx, server.address).run(state)
        except Exception:  # pylint: disable=broad-except
            report.violation("harness-error", "recovery-check",
                             traceback.format_exc())

    thread = threading.Thread(target=check, name="recovery-check",
                              daemon=True)
    thread.start()
    code = server.wait(kill_s)
    ctx.killing.set()
    if code is not None:
        report.violation("server-died", "-", "cycle %d: the server exited "
                         "with %d during recovery; log:\n%s"
                         % (ctx.cycle, code, server.log_tail()))
    server.kill()
    thread.join(JOIN_TIMEOUT_S)
    if thread.is_alive():
        raise HarnessError("the recovery check still runs %.0f s after the "
                           "kill" % JOIN_TIMEOUT_S)
    return start()


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of kill times, graceful stops and (for a "
                             "new work dir) the data; default: the clock")
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--min-kill-s", type=float, default=0.2)
    parser.add_argument("--max-kill-s", type=float, default=1.5)
    parser.add_argument("--graceful", type=float, default=0.25,
                        help="probability of a SIGTERM stop and restart after "
                             "a cycle's check")
    parser.add_argument("--recovery-kill", type=float, default=0.2,
                        help="probability of a second SIGKILL while the "
                             "restarted server is being checked")
    parser.add_argument("--wal-sync-ms", type=int, default=20,
                        help="the server's --wal_sync_ms; < 0 leaves the flag "
                             "out (servers without it)")
    parser.add_argument("--async-lag-s", type=float, default=1.0,
                        help="how far an ASYNC session's durable_position may "
                             "lag behind its stored tokens")
    parser.add_argument("--strict", action="store_true",
                        help="notes are violations: a step sent again after "
                             "a restart not answered as a retry, layers "
                             "resuming ahead of durable_position, Checkpoint "
                             "unimplemented")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="another flag for kvmem-server (repeatable)")
    parser.add_argument("--build", default=loadgen.default_build())
    parser.add_argument("--work-dir", default=None,
                        help="holds data/, journal.jsonl and server logs; "
                             "reused if it exists; default: a new temp dir, "
                             "removed when the run passes")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir even when the run passes")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Result:
    """The whole test; prints as it goes and returns the result."""
    result = Result(seed=(args.seed if args.seed is not None
                          else int(time.time() * 1000) % 1_000_000_007))
    binary = os.path.join(args.build, "service", "kvmem-server")
    if not os.access(binary, os.X_OK):
        result.error = ("no server binary at %s: cmake --build %s --target "
                        "kvmem-server kvmem_python_stubs"
                        % (binary, args.build))
        return result
    pb, rpc = loadgen.load_stubs(args.build)
    work = args.work_dir or tempfile.mkdtemp(prefix="kvmem-crash-")
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    # One binary for the whole run, whatever rebuilds the build dir meanwhile.
    built = binary
    binary = os.path.join(work, "kvmem-server")
    shutil.copy2(built, binary)
    journal_path = os.path.join(work, "journal.jsonl")
    state = checker.JournalState.from_records(
        loadgen.Journal.read(journal_path))
    journal = loadgen.Journal(journal_path)
    if state.seed is None:
        state.seed, state.sessions = result.seed, args.sessions
        journal.append({"e": "config", "seed": state.seed,
                        "sessions": state.sessions})
    result.data_seed = state.seed
    specs = loadgen.session_specs(state.sessions)
    flags = list(args.server_arg)
    if args.wal_sync_ms >= 0:
        flags.insert(0, "--wal_sync_ms=%d" % args.wal_sync_ms)
    rng = random.Random(result.seed)
    report = loadgen.Report(args.strict)
    print("crash test: %d cycles, seed %d, data seed %d, %d sessions (%s), "
          "kill after %.2f..%.2f s, server %s (built %s) %s, work dir %s" % (
              args.cycles, result.seed, state.seed, len(specs),
              " ".join(s.label for s in specs), args.min_kill_s,
              args.max_kill_s, built,
              time.strftime("%Y-%m-%d %H:%M:%S",
                            time.localtime(os.path.getmtime(built))),
              " ".join(flags), work), flush=True)
    starts = 0

    def start() -> ServerProcess:
        nonlocal starts
        starts += 1
        return ServerProcess(binary, os.path.join(work, "data"),
                             os.path.join(work, "server-%03d.log" % starts),
                             flags)

    # Sessions whose creation was acknowledged: journaled, and shared by
    # every phase's context (create_session adds to it).
    created = set(state.created)

    def context(phase: str, cycle: int) -> loadgen.Context:
        return loadgen.Context(pb, rpc, result.data_seed, journal, report,
                               phase, cycle, specs, created,
                               full_verify=phase != "load",
                               async_lag_s=args.async_lag_s)

    began = time.monotonic()
    server: Optional[ServerProcess] = None
    try:
        server = start()
        for cycle in range(1, args.cycles + 1):
            report.cycle = cycle
            report.cycle_violations = 0
            # 1-2: load, then SIGKILL at a random moment.
            ctx = context("load", cycle)
            load = loadgen.LoadGenerator(ctx, server.address)
            delay = rng.uniform(args.min_kill_s, args.max_kill_s)
            load.start()
            code = server.wait(delay)
            ctx.killing.set()
            load.stop.set()
            if code is not None:
                report.violation("server-died", "-", "cycle %d: the server "
                                 "exited with %d under load; log:\n%s"
                                 % (cycle, code, server.log_tail()))
            server.kill()
            result.kills += 1
            if not load.join(JOIN_TIMEOUT_S):
                raise HarnessError("load workers still running %.0f s after "
                                   "the kill" % JOIN_TIMEOUT_S)
            drivers = load.drivers()
            steps = sum(d.steps for d in drivers)
            tokens = sum(max(0, d.position - min(d.start_next))
                         for d in drivers)
            result.steps += steps
            result.tokens += tokens
            # 3: restart on the same data dir and check.
            server = start()
            restart_s = server.start_s
            recovery = ""
            if rng.random() < args.recovery_kill:
                # Sometimes killed again while the checker wakes sessions.
                kill_s = rng.uniform(0.0, 0.3)
                server = kill_during_check(server, kill_s,
                                           context("recovery", cycle),
                                           journal_path, start, report)
                result.kills += 1
                recovery = " | SIGKILL again %.2f s into the check" % kill_s
            check_began = time.monotonic()
            ctx = context("check", cycle)
            # The checker knows only what the journal on disk says.
            outcomes = checker.Checker(ctx, server.address).run(
                checker.JournalState.from_records(
                    loadgen.Journal.read(journal_path)))
            check_s = time.monotonic() - check_began
            # 4: sometimes a graceful stop, which must keep everything.
            graceful = ""
            if rng.random() < args.graceful:
                # A graceful stop checkpoints every session: all durable.
                expect = {o.spec.session_id: ([o.verified_to] * loadgen.LAYERS,
                                              o.verified_to)
                          for o in outcomes if o.verified_to}
                code = server.terminate()
                result.graceful_stops += 1
                if code != 0:
                    report.violation("graceful-stop", "-", "cycle %d: SIGTERM "
                                     "gave exit %s; log:\n%s"
                                     % (cycle, code, server.log_tail()))
                server = start()
                ctx = context("graceful-check", cycle)
                checker.Checker(ctx, server.address).run(
                    checker.JournalState.from_records(
                        loadgen.Journal.read(journal_path)), expect)
                graceful = " | SIGTERM+restart checked"
            if server.wait(0) is not None:
                raise HarnessError("the server exited during the check; log:\n"
                                   + server.log_tail())
            result.cycles = cycle
            print("cycle %d/%d: SIGKILL after %.2f s (%d steps, +%d tokens) | "
                  "restart %.2f s%s | %s | check %.2f s%s | violations %d"
                  % (cycle, args.cycles, delay, steps, tokens, restart_s,
                     recovery, " ".join(o.summary() for o in outcomes),
                     check_s, graceful, report.cycle_violations), flush=True)
        if server is not None:
            code = server.terminate()
            if code != 0:
                report.violation("graceful-stop", "-", "final SIGTERM gave "
                                 "exit %s; log:\n%s" % (code,
                                                        server.log_tail()))
            server = None
    except HarnessError as error:
        result.error = str(error)
    finally:
        if server is not None:
            server.kill()
        journal.close()
    result.duration_s = time.monotonic() - began
    result.violations = report.violation_count()
    result.violation_lines = report.lines(report.violations)
    result.note_lines = report.lines(report.notes)
    counters = ", ".join("%s %d" % kv
                         for kv in sorted(report.counters.items()))
    print("counters: %s" % (counters or "none"))
    for line in result.note_lines:
        print("note: " + line)
    for line in result.violation_lines:
        print("VIOLATION: " + line)
    if result.error:
        print("ERROR: " + result.error)
    print("crash test %s: %d cycles, %d kills, %d graceful stops, %d "
          "violations, %d steps, %d tokens, %.1f s (seed %d, data seed %d)"
          % ("passed" if result.passed else "FAILED", result.cycles,
             result.kills, result.graceful_stops, result.violations,
             result.steps, result.tokens, result.duration_s, result.seed,
             result.data_seed), flush=True)
    if result.passed and not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print("work dir kept: %s" % work)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the run passed, 1 on violations, 2 when it could not run."""
    result = run(parse_args(argv))
    if result.error is not None:
        return 2
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
