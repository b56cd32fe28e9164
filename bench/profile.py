"""Where a server's time goes: ``py-spy`` samples, summed by function.

``run.py --profile`` records the full oaproxy case during its 16-connection
load with ``py-spy record --gil --format raw`` (only samples holding the GIL:
Python running, not threads waiting) and prints ``summary``: the
functions that were running (self) and those on the stack (inclusive, each
counted once per sample), as shares of the samples. ``py-spy`` comes from
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


def summary(raw: Path, top: int = 25) -> list[str]:
    """The ``top`` functions by self and by inclusive share of the samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = [_PREFIX.sub("(", _LINE.sub(")", f)) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not samples:
        return ["profile: no samples"]
    lines = [f"profile: {samples} samples; self:"]
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("inclusive (oaproxy's own and Twisted's web frames):")
    shown = [
        (f, n)
        for f, n in inclusive.most_common()
        if ("oaproxy/" in f or "twisted/web" in f) and n / samples >= 0.02
    ]
    lines += [f"  {100 * n / samples:5.1f}%  {f}" for f, n in shown[:top]]
    return lines
