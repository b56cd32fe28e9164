"""``oaproxy upstreams …``, ``oaproxy keys …`` and ``oaproxy check-config``,
run in process on a sqlite store: what they print, what they store, what
they refuse, and that no secret is ever taken from the command line."""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.admin.loading import load
from oaproxy.cli import main
from oaproxy.routing import Router
from tests.adminclient import STORE_KEY
from tests.live import write_yaml

SK_FILE = "sk-file-0123456789abcdef"
SK_NEW = "sk-new-0123456789abcdef"


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config_path = os.path.join(self.directory, "config.yaml")
        self.write()

    def write(self, **more: Any) -> None:
        config: dict[str, Any] = {
            "dbtype": "sqlite",
            "dbaddr": os.path.join(self.directory, "db.sqlite"),
            "store_key": STORE_KEY,
            "authorization": {"alice": "ck-alice-0123456789"},
            "upstreams": [{"name": "file", "endpoint": "https://file.test/v1", "sk": "${FILE_SK}"}],
            **more,
        }
        write_yaml(self.config_path, {k: v for k, v in config.items() if v is not None})

    def run_cli(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdin", io.StringIO(stdin))
        code = main([*args, "--config", self.config_path], stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def loaded(self) -> Any:
        return load(self.config_path, {"FILE_SK": SK_FILE}, create_store=False)

    def test_add_list_remove(self) -> None:
        """An upstream added (its sk from stdin) is listed, used by the daemon's config, removed."""
        code, out, err = self.run_cli(
            "upstreams", "add", "extra", "--endpoint", "https://extra.test/v1", "--sk-stdin",
            "--allow", "m1,m2", "--set", "timeout=30", stdin=SK_NEW + "\n",
        )  # fmt: skip
        self.assertEqual((code, out), (0, ""), err)
        self.assertEqual(err, "oaproxy: upstream.added extra\n")
        code, out, _ = self.run_cli("upstreams", "list")
        self.assertEqual(code, 0)
        self.assertEqual(
            out.splitlines(),
            [
                "name   source  enabled  type    endpoint               models  sk",
                "file   config  yes      openai  https://file.test/v1   all     set",
                "extra  admin   yes      openai  https://extra.test/v1  m1,m2   set",
            ],
        )
        extra = self.loaded().config.upstreams[1]
        self.assertEqual((extra.sk, extra.allow, extra.timeout), (SK_NEW, ("m1", "m2"), 30.0))
        _, listed, _ = self.run_cli("upstreams", "list", "--format", "json")
        self.assertNotIn(SK_NEW, listed)
        self.assertEqual(json.loads(listed)[1]["settings"]["sk_set"], True)
        self.assertEqual(self.run_cli("upstreams", "remove", "extra")[0], 0)
        self.assertEqual([u.name for u in self.loaded().config.upstreams], ["file"])

    def test_sk_from_environment(self) -> None:
        """--sk-env reads the key from a variable, which must be set."""
        self.patch(os, "environ", {**os.environ, "NEW_SK": SK_NEW})
        code, _, err = self.run_cli(
            "upstreams", "add", "x", "--endpoint", "https://x.test/v1", "--sk-env", "NEW_SK"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(self.loaded().config.upstreams[1].sk, SK_NEW)
        code, _, err = self.run_cli(
            "upstreams", "add", "y", "--endpoint", "https://y.test/v1", "--sk-env", "UNSET_SK"
        )
        self.assertEqual((code, err), (2, "oaproxy: --sk-env UNSET_SK: that variable is not set\n"))

    def test_no_secret_on_the_command_line(self) -> None:
        """No option takes an upstream key as its value, --set sk=… included."""
        for given in (["--sk", SK_NEW], ["--set", f"sk={SK_NEW}"]):
            code, _, err = self.run_cli(
                "upstreams", "add", "x", "--endpoint", "https://x.test/v1", *given
            )
            self.assertEqual(code, 2, err)
        self.assertIn("a secret is never given on the command line", err)
        self.assertEqual(len(self.loaded().config.upstreams), 1)

    def test_types_and_proxy(self) -> None:
        """echo needs no --endpoint, openai does; a proxy URL with credentials is a
        secret, never taken from --set."""
        code, _, err = self.run_cli("upstreams", "add", "demo", "--type", "echo")
        self.assertEqual(code, 0, err)
        rows = [line.split() for line in self.run_cli("upstreams", "list")[1].splitlines()]
        self.assertEqual(rows[-1], ["demo", "admin", "yes", "echo", "-", "all", "-"])
        code, _, err = self.run_cli("upstreams", "add", "x")
        self.assertEqual((code, err), (2, "oaproxy: endpoint: upstream has no endpoint\n"))
        proxy = "proxy=http://u:pw-0123456789@proxy.test:3128"
        code, _, err = self.run_cli(
            "upstreams", "add", "p", "--endpoint", "https://p.test/v1", "--set", proxy
        )
        self.assertEqual(code, 2)
        self.assertIn("--set proxy: a secret is never given on the command line", err)
        self.assertNotIn("pw-0123456789", err)

    def test_sk_needs_store_key(self) -> None:
        """Without a usable store_key an sk is refused, saying why."""
        self.write(store_key="${OAPROXY_TEST_UNSET_VARIABLE}")
        code, _, err = self.run_cli(
            "upstreams", "add", "x", "--endpoint", "https://x.test/v1", "--sk-stdin", stdin="k\n"
        )
        self.assertEqual(code, 2)
        self.assertIn("store_key: must be a Fernet key", err)
        self.assertIn("is its environment variable set here?", err)
        self.write(store_key=None)
        code, _, err = self.run_cli(
            "upstreams", "add", "x", "--endpoint", "https://x.test/v1", "--sk-stdin", stdin="k\n"
        )
        self.assertEqual(code, 2)
        self.assertIn("the config has no store_key", err)

    def test_file_upstreams(self) -> None:
        """A file upstream is disabled and enabled, never removed; bad input is refused."""
        self.assertEqual(self.run_cli("upstreams", "disable", "file")[0], 0)
        self.assertEqual(self.loaded().config.upstreams, ())
        code, _, err = self.run_cli("upstreams", "remove", "file")
        self.assertEqual(code, 2)
        self.assertIn("disable it, or remove it from the file", err)
        self.assertEqual(self.run_cli("upstreams", "enable", "file")[0], 0)
        self.assertEqual(len(self.loaded().config.upstreams), 1)
        code, _, err = self.run_cli("upstreams", "add", "z", "--endpoint", "ftp://z")
        self.assertEqual(
            (code, err), (2, "oaproxy: endpoint: must be a URL starting with http:// or https://\n")
        )
        self.assertEqual(
            self.run_cli("upstreams", "enable", "nope")[2], "oaproxy: no upstream 'nope'\n"
        )

    def test_keys(self) -> None:
        """A new key's secret is printed once, on stdout; the daemon's config accepts it."""
        code, out, err = self.run_cli(
            "keys", "add", "bob", "--upstreams", "file", "--rate-limit", "10/minute"
        )
        self.assertEqual(code, 0, err)
        secret = out.strip()
        self.assertTrue(secret.startswith("sk-oaproxy-"))
        self.assertIn("shown this once", err)
        router = Router(self.loaded().config)
        caller = router.authenticate(b"Bearer " + secret.encode())
        self.assertEqual(caller.key.name if caller.key else None, "bob")
        code, out, _ = self.run_cli("keys", "list")
        self.assertEqual(
            out.splitlines(),
            [
                "name   source  upstreams  rate_limit  token_limit  budget",
                "alice  config  all        -           -            -",
                "bob    admin   file       10/minute   -            -",
            ],
        )
        self.assertNotIn(secret, out)
        self.assertEqual(self.run_cli("keys", "remove", "alice")[0], 2)
        self.assertEqual(self.run_cli("keys", "remove", "bob")[0], 0)
        self.assertEqual(self.run_cli("keys", "remove", "bob")[2], "oaproxy: no client key 'bob'\n")

    def test_check_config(self) -> None:
        """check-config reads the file from this environment, and the store."""
        code, out, err = self.run_cli("check-config")
        self.assertEqual(code, 2)
        self.assertIn("environment variable FILE_SK is not set", err)
        self.patch(os, "environ", {**os.environ, "FILE_SK": SK_FILE})
        code, out, err = self.run_cli("check-config")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(f"{self.config_path}: ok; 1 upstreams"), out)
