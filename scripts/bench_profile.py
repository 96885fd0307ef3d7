"""A py-spy profile of a gateway's process under the bench's stream load, split by phase of a call
(`scripts/bench.py --profile`).

py-spy samples the process's stacks (every thread, idle ones left out) without touching its code;
each sample is put in the phase of the call it was working for, from the frames it holds:

  request hooks     the hooks up to forwarding (routing, key swap, metering set-up, admission and
                    the commit of its pending row)
  response start    responseheaders: the meter and its decoder set up
  per chunk         the meter reading each piece of the stream
  end of stream     the response and error hooks but the ledger's completion
  completion        the ledger's completion: outcome, estimate, price, the row's update and commit
  mitmproxy         everything else: mitmproxy's connections, HTTP layers, event loop

Only the event loop's thread is split so (py-spy takes a thread waiting in C with a timeout, as
the store thread does, for a busy one): the phases' shares of its samples, times its CPU time per
answer from /proc, give each phase's CPU time per answer. The other threads (the store thread,
the estimator) are reported as /proc accounts them. py-spy pauses the process for every sample:
that inflates every thread's CPU time (the idle ones' most), so the shares are what to read, and
the CPU figures of the rounds (which run without py-spy) what to multiply them by.
"""

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")

PHASES = ("request hooks", "response start", "per chunk", "end of stream", "completion", "mitmproxy")
REQUEST_HOOKS = {"requestheaders", "request", "http_connect", "client_connected"}
END_HOOKS = {"response", "error"}
# Frames that put a sample in a phase whatever hook it came from, first match wins.
MARKERS = (
    ("__call__ (meterproxy/stream.py", "per chunk"),
    ("_close (addons/ledger.py", "completion"),
    ("_complete (addons/ledger.py", "completion"),
    ("_estimated (addons/ledger.py", "completion"),
    ("complete (addons/ledger.py", "completion"),
    ("metered_usage (meterproxy/", "completion"),
    ("admit (addons/ledger.py", "request hooks"),
    ("_run_urgent (meterproxy/writer.py", "request hooks"),  # the admission's commit, awaited
    ("LedgerWriter._run (meterproxy/writer.py", "completion"),  # the completions' commit
)


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(path) for path in [Path(sys.executable).with_name("py-spy")] if path.exists()), None
    )


def record(pid: int, seconds: int, out: Path, rate: int = 250) -> subprocess.Popen:
    """py-spy sampling `pid` for `seconds` into `out` (collapsed stacks, one per line with its count)."""
    command = [py_spy(), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate)]
    command += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def phase(frames: list[str]) -> str:
    """The phase of one sample, from its frames (outermost first)."""
    for marker, name in MARKERS:
        if any(marker in frame for frame in frames):
            return name
    for frame in frames:  # the outermost hook of the gateway's own addons
        qualified, _, where = frame.partition(" (")
        function = qualified.rpartition(".")[2]
        if where.startswith("addons/") and not where.startswith("addons/pipeline.py"):
            if function == "responseheaders":
                return "response start"
            if function in END_HOOKS:
                return "end of stream"
            if function in REQUEST_HOOKS:
                return "request hooks"
    return "mitmproxy"


def split(collapsed: str, root: str) -> Counter:
    """The event loop's samples by phase, from py-spy's raw output; `root` (the repository) is
    cut from file names."""
    samples: Counter = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.startswith("<module>") or not count.isdigit():
            continue  # another thread than the main one, mitmproxy's event loop
        frames = [frame.replace(root, "") for frame in stack.split(";")]
        samples[phase(frames)] += int(count)
    return samples


def thread_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread's name and CPU time (user + system) so far."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return threads


def report(samples: Counter, before: dict, after: dict, pid: int, streams: int) -> dict:
    """CPU time per stream: the event loop's by phase (its share of the samples times its
    accounted time), and every other thread's."""
    spent = {tid: (name, seconds - before.get(tid, (name, 0.0))[1]) for tid, (name, seconds) in after.items()}
    loop_us = spent.pop(pid, ("", 0.0))[1] * 1e6 / streams
    total = sum(samples.values()) or 1
    threads: Counter = Counter()
    for name, seconds in spent.values():
        threads[name] += seconds * 1e6 / streams
    return {
        "event loop, by phase": {name: round(samples[name] / total * loop_us) for name in PHASES},
        "other threads": {name: round(us) for name, us in threads.items() if us >= 1},
        "samples": total,
    }
