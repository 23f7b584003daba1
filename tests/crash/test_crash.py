"""The crash test's short version for CI: 3 cycles of load, SIGKILL, restart
and check (tests/crash/crash_test.py; 100 cycles on demand).

Run with Debian's /usr/bin/python3 -m pytest; KVMEM_BUILD names the build
directory (holding service/kvmem-server and python/); KVMEM_CRASH_SEED fixes
the seed (default: the clock, printed)."""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import crash_test  # noqa: E402  pylint: disable=wrong-import-position


def test_three_kill_cycles_lose_nothing_durable(
        tmp_path: pathlib.Path) -> None:
    """No acknowledged durable step is lost over 3 SIGKILL cycles, sessions
    resume where the server says, and every token reads back exactly."""
    argv = ["--cycles", "3", "--work-dir", str(tmp_path / "crash")]
    if os.environ.get("KVMEM_CRASH_SEED"):
        argv += ["--seed", os.environ["KVMEM_CRASH_SEED"]]
    result = crash_test.run(crash_test.parse_args(argv))
    assert result.error is None, result.error
    # One SIGKILL under load per cycle, and with 20% odds one more during
    # the check that follows it.
    assert 3 <= result.kills <= 6, result.kills
    assert result.passed, "%d violations (seed %d):\n%s" % (
        result.violations, result.seed, "\n".join(result.violation_lines))
