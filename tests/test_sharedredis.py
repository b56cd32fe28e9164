"""The shared Redis connection (``oaproxy.sharedredis``) says once when it is
up, or why it never will be, without the password: against the real Redis
and a private ``redis-server`` that asks for a password."""

from __future__ import annotations

import uuid

from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from oaproxy.sharedredis import SharedRedis
from tests.doubles import EventList, capture_log
from tests.live import SHARED_REDIS, PrivateRedis, reachable, reactor, unavailable, wait_for


def texts(events: EventList, part: str) -> list[str]:
    """The formatted lines of ``events`` that contain ``part``."""
    return [line for line in map(formatEvent, events) if line and part in line]


class ConnectionLinesTests(TestCase):
    def start(self, url: str) -> SharedRedis:
        shared = SharedRedis(url, f"oaproxy-test:{uuid.uuid4().hex}:", reactor)
        shared.startService()
        self.addCleanup(shared.stopService)
        return shared

    async def test_connected_once(self) -> None:
        host, port = SHARED_REDIS
        if not reachable(host, port):
            unavailable(f"no Redis on {host}:{port}")
        events = capture_log(self)
        shared = self.start(f"redis://{host}:{port}/0")
        await wait_for(lambda: shared.connected, timeout=10)
        await wait_for(lambda: bool(texts(events, "shared Redis connected at")), timeout=10)
        self.assertEqual(
            texts(events, "shared Redis connected at"), [f"shared Redis connected at {host}:{port}"]
        )

    async def test_refused_password_said_without_it(self) -> None:
        server = PrivateRedis(self.mktemp(), password="right-" + uuid.uuid4().hex)
        await server.start()
        self.addCleanup(server.kill)
        events = capture_log(self)
        wrong = "wrong-" + uuid.uuid4().hex
        self.start(f"redis://:{wrong}@127.0.0.1:{server.port}/0")
        await wait_for(lambda: bool(texts(events, "refused the connection")), timeout=10)
        [line] = texts(events, "refused the connection")
        self.assertIn(f"shared Redis at 127.0.0.1:{server.port} refused the connection", line)
        self.assertNotIn(wrong, line)
        self.assertEqual(texts(events, "shared Redis connected at"), [])
