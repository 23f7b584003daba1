"""Shared by the Python tests that run the kvmem-server binary: start it on
127.0.0.1:0 in a fresh data directory and read the port from its start
line; read a process's resident memory."""
import contextlib
import os
import re
import subprocess
import tempfile
from typing import Iterator, Tuple

BUILD = os.environ.get("KVMEM_BUILD", "build/release")
# Under AddressSanitizer freed memory sits in a quarantine, so resident
# memory says nothing about leaks there: RSS bounds are checked only
# without it (CTest sets KVMEM_SANITIZE from the build).
SANITIZED = os.environ.get("KVMEM_SANITIZE", "OFF") == "ON"


@contextlib.contextmanager
def running_server(*flags: str) -> Iterator[Tuple[subprocess.Popen, str]]:
    """Yields (process, "127.0.0.1:port"); kills the server on exit unless
    the test already stopped it. `flags` are extra server flags."""
    with tempfile.TemporaryDirectory() as data_dir:
        proc = subprocess.Popen(
            [os.path.join(BUILD, "service", "kvmem-server"),
             "--listen=127.0.0.1:0", "--data_dir=" + data_dir, *flags],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = proc.stdout.readline()
        match = re.search(r"listening on (127\.0\.0\.1:(\d+))", line)
        try:
            assert match and int(match.group(2)) > 0, \
                "start line was: %r" % line
            yield proc, match.group(1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid`, MiB."""
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS for pid %d" % pid)
