"""Where a server's time goes: ``py-spy`` samples, summed by function.

``run.py --profile`` records the full oaproxy case during its 16-connection
load with ``py-spy record --gil --format raw`` (only samples holding the GIL:
Python running, not threads waiting) and prints ``summary``: the shares of
the samples by part of the daemon (``PARTS``), the functions that were
running (self) and those on the stack (inclusive, each counted once per
sample). ``py-spy`` comes from
``pip install py-spy`` into the bench's virtualenv (it needs ptrace: root, or
``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Frames as py-spy writes them: "function (path/to/file.py:line)".
_LINE = re.compile(r":\d+\)$")
_PREFIX = re.compile(r"\((?:.*/site-packages/|.*?/(?=oaproxy/|bench/))")


def py_spy() -> str | None:
    """The py-spy beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Start sampling ``pid`` for ``seconds`` into ``out``; None without py-spy."""
    binary = py_spy()
    if binary is None:
        return None
    argv = [binary, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "250", "--gil"]
    argv += ["-f", "raw", "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# The parts of the daemon, by the file of a frame: each sample goes to the
# part of its innermost frame that has one (so a library call is counted
# with the part that made it); a sample in none of them is the reactor's.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("metrics", ("oaproxy/metrics.py", "oaproxy/tallies.py", "oaproxy/frontmetrics.py")),
    ("records: making", ("oaproxy/records.py", "oaproxy/capture.py", "oaproxy/credentials.py")),
    # record.py's encode_record and record_document: the sinks' JSON.
    ("records: sinks", ("oaproxy/sinks/", "oaproxy/recordstore.py", "oaproxy/record.py")),
    ("limits", ("oaproxy/traffic/",)),
    ("cache", ("oaproxy/cache/",)),
    ("upstream client", ("oaproxy/upstreamclient/",)),
    ("forwarding and relay", ("oaproxy/forward.py", "oaproxy/relay.py", "oaproxy/sse.py")),
    (
        "pipeline (keys, inspection, routing, gates)",
        (
            "oaproxy/pipeline.py",
            "oaproxy/inspection.py",
            "oaproxy/jsonscan.py",
            "oaproxy/routing.py",
            "oaproxy/balancing.py",
            "oaproxy/breaker.py",
            "oaproxy/circuits.py",
            "oaproxy/bodyrules.py",
            "oaproxy/requestbody.py",
            "oaproxy/paths.py",
            "oaproxy/headers.py",
            "oaproxy/observers.py",
            "oaproxy/ledger.py",
            "oaproxy/health.py",
            "oaproxy/answers.py",
        ),
    ),
    (
        "front (twisted.web: server, Headers; channel, CORS)",
        ("oaproxy/web.py", "oaproxy/channel.py", "oaproxy/cors.py", "twisted/web/"),
    ),
)


def part_of(frame: str) -> str | None:
    for name, files in PARTS:
        if any(f in frame for f in files):
            return name
    return None


def summary(raw: Path, top: int = 25) -> list[str]:
    """The ``top`` functions by self and by inclusive share of the samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = [_PREFIX.sub("(", _LINE.sub(")", f)) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        named = (part_of(f) for f in reversed(frames))
        parts[next((p for p in named if p is not None), "reactor, Deferreds, other")] += n
    if not samples:
        return ["profile: no samples"]
    lines = [f"profile: {samples} samples; by part of the daemon:"]
    lines += [f"  {100 * n / samples:5.1f}%  {p}" for p, n in parts.most_common()]
    lines.append("self:")
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("inclusive (oaproxy's own and Twisted's web frames):")
    shown = [
        (f, n)
        for f, n in inclusive.most_common()
        if ("oaproxy/" in f or "twisted/web" in f) and n / samples >= 0.02
    ]
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in shown[:top]]
    return lines
