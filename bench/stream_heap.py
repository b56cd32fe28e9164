"""What each open stream holds: oaproxy's Python heap per open stream, by
where it was allocated.

    python bench/stream_heap.py [--streams 100] [--at 5] [--top 25] [--frames 16]

The fake upstream and an oaproxy configured as ``run.py``'s ``oaproxy``
case; oaproxy runs in a child of this file (``--serve``) that wraps
``twistd`` with two signal handlers: SIGUSR1 starts ``tracemalloc`` and
takes a first snapshot, SIGUSR2 takes a second one and writes what grew
between them. Between the two, after a warm-up, ``--streams`` paced streams
(``streams.py --mode hold``) are opened and read for ``--at`` seconds (an
event every 50 ms: 5 s is the halfway point where ``run.py`` reads the
RSS). Printed per open stream (the ``StreamRelay`` objects alive): the
bytes by file, by line, and by the innermost oaproxy frame that made them
(a Twisted ``Headers`` made by ``web.py`` counts as ``web.py``'s).

``tracemalloc`` makes the server several times slower: with too many
streams it falls behind the paced events, and the figures then show write
buffers waiting rather than what a stream holds; 100-200 streams keep it
honest. Allocations the probe itself makes (its snapshots) show up as this
file's and the import system's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

from procs import (
    CLIENT_KEY,
    HERE,
    PATH,
    UPSTREAM_KEY,
    Children,
    free_port,
    oaproxy_argv,
    run_driver,
    start_fake_upstream,
    wait_ready,
    with_children,
)
from run import FULL_CONFIG

PACED_INTERVAL = 0.05
_STDLIB = re.compile(r"^.*/lib/python3\.\d+/")
REPORT_WAIT = 300.0


class Probe:
    """The child's side: the snapshots, on the signals."""

    def __init__(self, report: Path, frames: int) -> None:
        self.report = report
        self.frames = frames
        self.first: tracemalloc.Snapshot | None = None

    def start(self, *_: Any) -> None:
        gc.collect()
        tracemalloc.start(self.frames)
        self.first = tracemalloc.take_snapshot()
        # The parent opens the streams once the first snapshot is taken.
        self.report.with_suffix(".started").touch()

    def finish(self, *_: Any) -> None:
        assert self.first is not None
        gc.collect()
        second = tracemalloc.take_snapshot()
        tracemalloc.stop()
        streams = sum(1 for o in gc.get_objects() if type(o).__name__ == "StreamRelay")
        grown = [s for s in second.compare_to(self.first, "traceback") if s.size_diff]
        files: Counter[str] = Counter()
        lines: Counter[str] = Counter()
        made_by: Counter[str] = Counter()
        for stat in grown:
            frame = stat.traceback[-1]  # the most recent
            files[_short(frame.filename)] += stat.size_diff
            lines[f"{_short(frame.filename)}:{frame.lineno}"] += stat.size_diff
            made_by[_made_by(stat.traceback)] += stat.size_diff
        report = {
            "streams": streams,
            "total": sum(s.size_diff for s in grown),
            "waiting": _waiting_writes(),
            "files": files.most_common(),
            "lines": lines.most_common(),
            "made_by": made_by.most_common(),
        }
        tmp = self.report.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        tmp.rename(self.report)


def _short(filename: str) -> str:
    """A file's name from its package on (``oaproxy/relay.py``, ``json/decoder.py``)."""
    for marker in ("/site-packages/", "/oaproxy/"):
        if marker in filename:
            tail = filename.rsplit(marker, 1)[1]
            return f"oaproxy/{tail}" if marker == "/oaproxy/" else tail
    return _STDLIB.sub("", filename)


def _waiting_writes() -> int:
    """Bytes written to connections and not sent yet: the server was behind."""
    from twisted.internet.abstract import FileDescriptor

    return sum(
        sum(map(len, o._tempDataBuffer)) + len(o.dataBuffer) - o.offset
        for o in gc.get_objects()
        if isinstance(o, FileDescriptor)
    )


def _made_by(traceback: tracemalloc.Traceback) -> str:
    """The innermost oaproxy frame of an allocation (else its own frame)."""
    for frame in reversed(list(traceback)):
        if "/oaproxy/" in frame.filename:
            return f"{_short(frame.filename)}:{frame.lineno}"
    frame = traceback[-1]
    return f"(outside oaproxy) {_short(frame.filename)}:{frame.lineno}"


def serve(report: Path, frames: int, twistd_args: list[str]) -> None:
    from twisted.scripts.twistd import run as twistd

    probe = Probe(report, frames)
    signal.signal(signal.SIGUSR1, probe.start)
    signal.signal(signal.SIGUSR2, probe.finish)
    sys.argv = ["twistd", *twistd_args]
    twistd()


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"stream_heap: oaproxy exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit(f"stream_heap: no {path.name} after {timeout:g}s")
        time.sleep(0.1)


def measure(args: argparse.Namespace, children: Children, directory: Path) -> dict[str, Any]:
    stream_seconds = args.at * 2 + 10
    paced = ("--paced-chunks", str(int(stream_seconds / PACED_INTERVAL)))
    _fake, upstream = start_fake_upstream(children, 20, stream_seconds + 120, more=paced)
    config = directory / "config.yaml"
    config.write_text(
        FULL_CONFIG.format(key=CLIENT_KEY, sk=UPSTREAM_KEY, port_a=upstream, port_b=upstream)
    )
    port = free_port()
    report = directory / "heap.json"
    serve_argv = [sys.executable, __file__, "--serve", str(report), "--frames", str(args.frames)]
    log = directory / "server.log"
    env = {**os.environ}
    if args.oaproxy is not None:
        env["PYTHONPATH"] = str(args.oaproxy.resolve())
    with log.open("wb") as out:
        server = children.start(
            [*serve_argv, "--", *oaproxy_argv(config, port)[1:]],
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wait_ready(port, server, log)
    streams = [str(HERE / "streams.py"), "--url", f"http://127.0.0.1:{port}{PATH}"]
    streams += ["--key", CLIENT_KEY]
    # What the first requests make once (imports, caches) is not a stream's.
    run_driver(
        [sys.executable, *streams, "--mode", "rate", "--streams", "50", "--seconds", "1"], 60
    )
    server.send_signal(signal.SIGUSR1)
    wait_for(report.with_suffix(".started"), server, REPORT_WAIT)
    hold = children.start(
        [sys.executable, *streams, "--mode", "hold", "--streams", str(args.streams)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(args.at)
    server.send_signal(signal.SIGUSR2)
    wait_for(report, server, REPORT_WAIT)
    children.stop(hold)
    result: dict[str, Any] = json.loads(report.read_text())
    return result


def show(result: dict[str, Any], top: int) -> None:
    n = max(1, result["streams"])
    print(
        f"{result['streams']} streams open; per stream {result['total'] / n:,.0f} B of Python heap"
    )
    waiting = result["waiting"] / n
    print(f"  of which {waiting:,.0f} B written and not sent yet", end="")
    # More than a few events' worth: tracemalloc made it fall behind.
    print(" (the server fell behind: fewer --streams)" if waiting > 1000 else "")
    for title, key in (
        ("by file", "files"),
        ("by line", "lines"),
        ("by the oaproxy code that made it", "made_by"),
    ):
        print(f"\n{title}:")
        for name, size in result[key][:top]:
            print(f"  {size / n:8,.0f} B  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=100, help="paced streams held open")
    parser.add_argument("--at", type=float, default=5.0, help="seconds into the streams")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument("--frames", type=int, default=16, help="tracemalloc frames kept")
    parser.add_argument(
        "--oaproxy", type=Path, default=None, help="another checkout's oaproxy (PYTHONPATH)"
    )
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("twistd", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.frames, args.twistd)
        return 0

    def run(children: Children, directory: Path) -> int:
        show(measure(args, children, directory), args.top)
        return 0

    return with_children("stream_heap", run)


if __name__ == "__main__":
    sys.exit(main())
