"""End to end through the official openai SDKs (Python and Node) on real
sockets: a stream whose first upstream dies mid-answer, or stalls, is
continued on the next one, and the SDK's iterator yields the whole answer.

The Node SDK is tests/node's (``npm ci --prefix tests/node``, in README's
test command); without node or that install the Node test is skipped, and
under ``CI=true`` it fails.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.fakeupstream import DEFAULT_CHUNKS, FakeUpstream, Stream
from tests.live import EndToEndCase, RunningProxy, collect_stream, unavailable
from tests.payloads import CLIENT_KEY, FAKE_MODEL, upstream

ANSWER = "".join(DEFAULT_CHUNKS)
NODE_DIR = os.path.join(os.path.dirname(__file__), "node")


class SDKResumeTests(EndToEndCase):
    async def resuming_proxy(
        self, first: Stream, **top: Any
    ) -> tuple[RunningProxy, FakeUpstream, FakeUpstream]:
        """A proxy over two fakes: the first answers ``first``, the second
        continues with the rest of the canonical answer."""
        dying = await self.fake(default=first)
        rest = DEFAULT_CHUNKS[first.close_after or first.hang_after or 0 :]
        second = await self.fake(default=Stream(chunks=rest, chunk_id="chatcmpl-second"))
        proxy = await self.proxy(
            [upstream("dying", dying.endpoint), upstream("second", second.endpoint)], **top
        )
        return proxy, dying, second

    async def test_python_sdk_stream_cut_mid_answer(self) -> None:
        """The first upstream closes the connection after two of four chunks:
        the Python SDK's iterator yields the complete canonical text, the
        second upstream was sent the text so far as an assistant message,
        and the record shows the resume."""
        proxy, _, second = await self.resuming_proxy(Stream(close_after=2))
        deltas, usages = await self.sdk(proxy, lambda client: collect_stream(client, True))
        self.assertEqual("".join(deltas), ANSWER)
        self.assertEqual(len(usages), 1)
        sent = (await second.received()).json()
        self.assertEqual(sent["messages"][-1], {"role": "assistant", "content": "Hello, "})
        record = await proxy.records.nth()
        self.assertEqual(record["outcome"], "ok")
        self.assertEqual(record["response_text"], ANSWER)
        self.assertEqual(
            [(a["upstream"], a.get("resumed"), a.get("resumed_at")) for a in record["attempts"]],
            [("dying", None, None), ("second", "prefill", len("Hello, "))],
        )

    async def test_python_sdk_stream_stalled(self) -> None:
        """A first upstream that falls silent after one chunk is left after
        stream_idle_timeout and the answer completes on the second."""
        proxy, _, _ = await self.resuming_proxy(Stream(hang_after=1), stream_idle_timeout=0.5)
        deltas, _ = await self.sdk(proxy, lambda client: collect_stream(client))
        self.assertEqual("".join(deltas), ANSWER)

    async def test_node_sdk_stream_cut_mid_answer(self) -> None:
        """The same through the official Node SDK: its async iterator yields
        the canonical text, under the first upstream's id, with one role and
        one finish."""
        node = shutil.which("node")
        if node is None:
            unavailable("node is not installed (the Node SDK test needs it)")
        if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "openai")):
            unavailable("the Node SDK is not installed: npm ci --prefix tests/node")
        proxy, _, _ = await self.resuming_proxy(Stream(close_after=3))
        script = os.path.join(NODE_DIR, "stream.mjs")
        out, err, code = await getProcessOutputAndValue(
            node,
            [script, proxy.base_url, CLIENT_KEY, FAKE_MODEL],
            env={"PATH": os.environ.get("PATH", ""), "NO_PROXY": "*"},
            path=NODE_DIR,
            reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        got = json.loads(out.decode("utf-8").strip().splitlines()[-1])
        self.assertEqual(
            got, {"text": ANSWER, "ids": ["chatcmpl-fake"], "finish": ["stop"], "roles": 1}
        )
