"""The store with the real twistd: changes made through the API survive a
restart and a SIGHUP; changes made by the CLI (or by hand) reach a running
daemon, with or without admin_key; two daemons on one PostgreSQL follow each
other; check-config says what twistd says.

The daemons look at the store every 0.2 s (``store_poll_interval``) so that
the tests wait little; waiting is bounded polling on the reactor.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.adminclient import ADMIN_KEY, STORE_KEY, AdminClient
from tests.fakeupstream import FAKE_MODEL, FakeUpstream
from tests.live import (
    POLL,
    POSTGRES_DSN,
    SHARED_POSTGRES,
    child_env,
    free_port,
    post_json,
    postgres_schema,
    reachable,
    reactor,
    read_body,
    run_twistd,
    spawn_daemon,
    unavailable,
    write_yaml,
)
from tests.payloads import upstream
from tests.test_daemon import TWISTD_ARGS, DaemonCase, base_config

KEY = "ck-file-0123456789abcdef"
SK_FILE = "sk-file-0123456789abcdef"
SK_NEW = "sk-new-0123456789abcdef"
#: How often the test daemons look at the store.
CHECK = 0.2


class StoreDaemonCase(DaemonCase):
    timeout = 60

    def env(self) -> dict[str, str]:
        env = child_env()
        env["OAPROXY_STORE_KEY"] = STORE_KEY
        return env

    def config(self, port: int, fake: FakeUpstream, **more: Any) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "admin_key": ADMIN_KEY,
            "store_key": "${OAPROXY_STORE_KEY}",
            "store_poll_interval": CHECK,
            "dbtype": "sqlite",
            "dbaddr": "./db.sqlite",
            **more,
        }
        settings = {k: v for k, v in settings.items() if v is not None}
        files = [upstream("file", fake.endpoint, SK_FILE, allow=[FAKE_MODEL])]
        return base_config(port, {"file-key": KEY}, files, **settings)

    async def start(self, config: dict[str, Any]) -> Any:
        daemon = self.spawn(config, env=self.env())
        await self.serving(daemon, int(config["listen"].split(":")[1]))
        return daemon

    async def until(self, check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
        """Until ``check()`` is true, looking every POLL seconds, for ``timeout`` at most."""
        for _ in range(int(timeout / POLL)):
            if await check():
                return
            await deferLater(reactor, POLL, lambda: None)
        self.fail(f"not so within {timeout} s")

    async def chat_with(self, port: int, key: str, model: str) -> int:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        response = await post_json(
            self.agent, f"http://127.0.0.1:{port}/v1/chat/completions", key, body.encode()
        )
        await read_body(response)
        return int(response.code)

    async def cli(self, *args: str, env: dict[str, str] | None = None) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "oaproxy", *args, "--config", "config.yaml"],
            env=env or self.env(),
            path=self.cwd,
            reactor=reactor,
        )
        return out.decode(), err.decode(), code


class PersistenceTests(StoreDaemonCase):
    async def test_restart(self) -> None:
        """An upstream (with its sk) and a key added through the API work after a restart."""
        file, fresh = await self.fake(), await self.fake()
        port = free_port()
        daemon = await self.start(self.config(port, file))
        admin = AdminClient(port)
        body = {"name": "fresh", "endpoint": fresh.endpoint, "sk": SK_NEW, "allow": "fresh-model"}
        self.assertEqual((await admin.call("POST", "/upstreams", body)).status, 201)
        added = await admin.call("POST", "/keys", {"name": "carol", "upstreams": ["fresh"]})
        secret = added.body["key"]
        self.assertEqual(await self.chat_with(port, secret, "fresh-model"), 200)

        daemon.signal("TERM")
        await daemon.end()
        self.assertNotIn(SK_NEW, daemon.text)
        self.assertNotIn(secret, daemon.text)
        again = await self.start(self.config(port, file))
        self.assertEqual(await self.chat_with(port, secret, "fresh-model"), 200)
        self.assertEqual(len(fresh.requests), 2)
        self.assertEqual(fresh.requests[1].header(b"authorization"), f"Bearer {SK_NEW}".encode())
        listed = await admin.upstream("fresh")
        assert listed is not None
        self.assertEqual((listed["source"], listed["settings"]["sk_set"]), ("admin", True))
        self.assertIn("upstream fresh:", again.text)

    async def test_sighup_keeps_the_store(self) -> None:
        """A SIGHUP reads the file and the store again: the store's changes stay."""
        file, fresh = await self.fake(), await self.fake()
        port = free_port()
        daemon = await self.start(self.config(port, file))
        admin = AdminClient(port)
        await admin.call("POST", "/upstreams", {"name": "fresh", "endpoint": fresh.endpoint})
        await admin.call("POST", "/upstreams/file/disable")
        write_yaml(self.config_path, self.config(port, file, timeout=7))
        daemon.signal("HUP")
        await daemon.wait_for("config reloaded")
        listed = (await admin.get("/upstreams"))["data"]
        self.assertEqual(
            [(u["name"], u["enabled"], u["settings"]["timeout"]) for u in listed],
            [("fresh", True, 7.0), ("file", False, 7.0)],
        )


class FollowingTests(StoreDaemonCase):
    async def test_cli_change_reaches_a_daemon_without_admin_key(self) -> None:
        """A key and an upstream added by the CLI serve a running daemon that has no admin API."""
        file, fresh = await self.fake(), await self.fake()
        port = free_port()
        daemon = await self.start(self.config(port, file, admin_key=None))
        env = {**self.env(), "NEW_SK": SK_NEW}
        out, err, code = await self.cli(
            "upstreams", "add", "fresh", "--endpoint", fresh.endpoint, "--sk-env", "NEW_SK",
            "--allow", "fresh-model", env=env,
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        out, err, code = await self.cli("keys", "add", "dave", "--upstreams", "fresh")
        self.assertEqual(code, 0, err)
        secret = out.strip()

        async def served() -> bool:
            return await self.chat_with(port, secret, "fresh-model") == 200

        await self.until(served, timeout=5)
        self.assertEqual(fresh.requests[-1].header(b"authorization"), f"Bearer {SK_NEW}".encode())
        # The CLI's audit entries are in the daemon's log too, without a secret.
        await daemon.wait_for("key.added dave")
        self.assertIn("store change by cli ", daemon.text)
        self.assertIn('upstream.added fresh {"allow": ["fresh-model"]', daemon.text)
        self.assertNotIn(SK_NEW, daemon.text)
        self.assertNotIn(secret, daemon.text)

    async def test_edit_by_hand_reaches_a_daemon(self) -> None:
        """An UPDATE of oaproxy_upstreams by hand is noticed: the upstream is disabled."""
        file = await self.fake()
        port = free_port()
        daemon = await self.start(self.config(port, file))
        self.assertEqual(await self.chat_with(port, KEY, FAKE_MODEL), 200)
        connection = sqlite3.connect(os.path.join(self.cwd, "db.sqlite"))
        connection.execute(
            "INSERT INTO oaproxy_upstreams (name, source, enabled) VALUES ('file', 'config', 0)"
        )
        connection.commit()
        connection.close()

        async def refused() -> bool:
            return await self.chat_with(port, KEY, FAKE_MODEL) == 404

        await self.until(refused, timeout=5)
        await daemon.wait_for("upstreams added: file")

    async def test_bad_row_refused_once(self) -> None:
        """A row that does not read is refused with one log line; the daemon keeps serving."""
        file = await self.fake()
        port = free_port()
        daemon = await self.start(self.config(port, file))
        connection = sqlite3.connect(os.path.join(self.cwd, "db.sqlite"))
        connection.execute(
            "INSERT INTO oaproxy_upstreams (name, settings) VALUES ('odd', '{\"timeout\": 1}')"
        )
        connection.commit()
        connection.close()
        await daemon.wait_for("oaproxy_upstreams[odd].endpoint: upstream has no endpoint")
        await deferLater(reactor, 5 * CHECK, lambda: None)
        self.assertEqual(daemon.text.count("store change refused"), 1)
        self.assertEqual(await self.chat_with(port, KEY, FAKE_MODEL), 200)


class PostgresFollowingTests(StoreDaemonCase):
    async def test_two_daemons(self) -> None:
        """A key added through one daemon's API is accepted by another daemon on the same store."""
        if not reachable(*SHARED_POSTGRES):
            unavailable("PostgreSQL is not running on 127.0.0.1:5432")
        dbaddr = postgres_schema(self, f"oaproxy_two_{uuid.uuid4().hex[:12]}", POSTGRES_DSN)
        file = await self.fake()
        first, second = free_port(), free_port()
        await self.start(self.config(first, file, dbtype="postgres", dbaddr=dbaddr))
        other = os.path.join(self.cwd, "other")
        os.makedirs(other)
        write_yaml(
            os.path.join(other, "config.yaml"),
            self.config(second, file, dbtype="postgres", dbaddr=dbaddr),
        )
        daemon = spawn_daemon(self, TWISTD_ARGS, other, env=self.env())
        await self.serving(daemon, second)
        added = await AdminClient(first).call("POST", "/keys", {"name": "erin"})
        secret = added.body["key"]

        async def accepted() -> bool:
            return await self.chat_with(second, secret, FAKE_MODEL) == 200

        await self.until(accepted, timeout=5)


class CheckConfigTests(StoreDaemonCase):
    async def same_line(self, config: dict[str, Any]) -> str:
        """twistd's one line and check-config's, which must be one."""
        write_yaml(self.config_path, config)
        _, twistd_err, twistd_code = await run_twistd(TWISTD_ARGS, self.cwd, env=self.env())
        out, err, code = await self.cli("check-config")
        self.assertNotEqual(twistd_code, 0)
        self.assertEqual(code, 2)
        self.assertEqual(out, "")
        self.assertEqual(err, twistd_err.decode())
        self.assertEqual(len(err.splitlines()), 1, err)
        return err

    async def test_bad_file(self) -> None:
        """A bad key in the file: check-config and twistd say the same line."""
        file = await self.fake()
        line = await self.same_line(self.config(free_port(), file, timeout="soon"))
        self.assertIn(": timeout: expected a number", line)

    async def test_bad_row(self) -> None:
        """A bad row in the store: the same line from both, naming the row."""
        file = await self.fake()
        config = self.config(free_port(), file)
        write_yaml(self.config_path, config)
        out, err, code = await self.cli("check-config")
        self.assertEqual(code, 0, err)
        self.assertIn("ok", out)
        out, err, code = await self.cli("upstreams", "disable", "file")
        self.assertEqual(code, 0, err)
        connection = sqlite3.connect(os.path.join(self.cwd, "db.sqlite"))
        connection.execute("UPDATE oaproxy_upstreams SET settings = 'nonsense'")
        connection.commit()
        connection.close()
        line = await self.same_line(config)
        self.assertIn("the store: oaproxy_upstreams[file].settings: not JSON", line)
