"""How long a large non-stream answer holds the daemon: ``/healthz`` latency
while one passes through oaproxy::

    python bench/large_answer.py [--mib 256] [--kind embeddings|chat]

A raw upstream (a thread of this process) answers every request with one
prebuilt JSON answer of about ``--mib`` MiB: ``embeddings`` (numbers, the
costliest JSON to parse, usage last, as OpenAI sends it) or ``chat`` (one long
content string). oaproxy runs as ``twistd`` with a temporary config; one
client thread asks for the answer and reads it, while the main thread asks
``/healthz`` every 20 ms on a new connection. The report gives the answer's
size and time, and the ``/healthz`` latencies meanwhile (median, max): a
stalled reactor shows as a max near the stall.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLIENT_KEY = "sk-bench-client-0123456789"
POLL_INTERVAL = 0.02


def embeddings_body(mib: int) -> bytes:
    vector = b"[" + b"0.0123456789," * 3071 + b"0.0123456789]"
    item = b'{"object":"embedding","index":0,"embedding":' + vector + b"}"
    count = mib * 1024 * 1024 // len(item)
    return (
        b'{"object":"list","data":['
        + b",".join([item] * count)
        + b'],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}'
    )


def chat_body(mib: int) -> bytes:
    answer = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "x" * (mib * 1024 * 1024)},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17},
    }
    return json.dumps(answer).encode()


def serve(listener: socket.socket, answer: bytes) -> None:
    """Answer each connection's request with ``answer``, then close it."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(answer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthz(port: int) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    conn.close()
    return time.perf_counter() - started


def ask(port: int, path: str, result: dict[str, float]) -> None:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": "bench", "input": "hi", "messages": []})
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    conn.request("POST", path, body, headers)
    response = conn.getresponse()
    size = 0
    while chunk := response.read(1 << 20):
        size += len(chunk)
    conn.close()
    result.update(status=response.status, size=size, seconds=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--kind", choices=("embeddings", "chat"), default="embeddings")
    args = parser.parse_args(argv)
    body = embeddings_body(args.mib) if args.kind == "embeddings" else chat_body(args.mib)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    ) + body
    listener = socket.create_server(("127.0.0.1", 0))
    upstream_port = listener.getsockname()[1]
    threading.Thread(target=serve, args=(listener, answer), daemon=True).start()
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "config.yaml"
        config.write_text(
            f"authorization: {{bench: {CLIENT_KEY}}}\ndbtype: none\ntimeout: 600\n"
            f"upstreams: [{{name: raw, endpoint: 'http://127.0.0.1:{upstream_port}/v1'}}]\n"
        )
        twistd = str(Path(sys.executable).parent / "twistd")
        command = [twistd, "-n", "--pidfile=", "oaproxy", "--config", str(config)]
        command += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
        proxy = subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    healthz(port)
                    break
                except OSError:
                    time.sleep(0.1)
            path = "/v1/embeddings" if args.kind == "embeddings" else "/v1/chat/completions"
            result: dict[str, float] = {}
            client = threading.Thread(target=ask, args=(port, path, result))
            client.start()
            latencies = []
            while client.is_alive():
                latencies.append(healthz(port))
                time.sleep(POLL_INTERVAL)
            # The record is made once the answer is written: look a while longer.
            for _ in range(50):
                latencies.append(healthz(port))
                time.sleep(POLL_INTERVAL)
        finally:
            proxy.terminate()
            proxy.wait(timeout=30)
            listener.close()
    print(
        f"{args.kind} answer: {len(body) / 2**20:.0f} MiB, status {result.get('status')}, "
        f"{result.get('seconds', 0):.2f} s; /healthz while it passed: "
        f"{len(latencies)} asked, median {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
