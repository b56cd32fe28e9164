"""The store's settings as config: JSON read by the file's own readers, the
overlay on the file, what the API shows, sealing, and each change's decision."""

from __future__ import annotations

import json
from typing import Any

from attrs import field, frozen
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.activity import RECENT, RecentAttempts, UpstreamState, upstream_state
from oaproxy.admin.changes import (
    ChangeContext,
    Refusal,
    RefusalKind,
    add_key,
    add_upstream,
    change_upstream,
    new_key_secret,
    remove_key,
    remove_upstream,
    set_enabled,
)
from oaproxy.admin.describe import describe_key, describe_upstream, settings_json
from oaproxy.admin.overlay import overlay
from oaproxy.admin.sealing import Sealer, SealingError
from oaproxy.admin.stored import EMPTY, Source, StoredKey, StoredUpstream, StoreSnapshot
from oaproxy.admin.tables import Change, DropKey, DropUpstream, PutKey, PutUpstream
from oaproxy.balancing import LATENCY_WEIGHT, LoadFollowing, UpstreamLoad
from oaproxy.circuits import Circuits, CircuitState
from oaproxy.config import Config, ConfigError, Upstream, all_client_keys, key_digest
from oaproxy.config.jsonvalues import read_json_section
from oaproxy.config.schema import file_fields, read
from oaproxy.config.values import boolean
from oaproxy.credentials import public_text
from oaproxy.exchange import AttemptLog
from oaproxy.health import Readiness
from oaproxy.pipeline import Observers
from oaproxy.record import FailureKind
from oaproxy.routing import Router
from oaproxy.summary import summary
from tests.adminclient import STORE_KEY
from tests.doubles import bare_exchange, make_config

FILE = f"""
store_key: {STORE_KEY}
timeout: 50
authorization: {{alice: ck-alice-0123456789}}
upstreams:
  - {{name: main, endpoint: https://main.test/v1, sk: sk-main-0123456789}}
  - name: guarded
    endpoint: https://guarded.test/v1
    authorization: {{guest: ck-guest-0123456789}}
"""


def file_config(text: str = FILE) -> Config:
    return make_config(text)


def context(config: Config | None = None) -> ChangeContext:
    config = config or file_config()
    return ChangeContext(config, Sealer.from_config(config), "test", 1000.0)


def applied(stored: StoreSnapshot, change: Change) -> StoreSnapshot:
    """What the tables hold once ``change`` is written (as ``apply_writes`` does)."""
    upstreams, keys = list(stored.upstreams), list(stored.keys)
    for write in change.writes:
        if isinstance(write, PutUpstream):
            names = [row.name for row in upstreams]
            if write.row.name in names:
                upstreams[names.index(write.row.name)] = write.row
            else:
                upstreams.append(write.row)
        elif isinstance(write, DropUpstream):
            upstreams = [row for row in upstreams if row.name != write.name]
        elif isinstance(write, PutKey):
            keys.append(write.row)
        elif isinstance(write, DropKey):
            keys = [row for row in keys if row.name != write.name]
    return StoreSnapshot(stored.version + 1, tuple(upstreams), tuple(keys))


def admin_row(name: str, **settings: Any) -> StoredUpstream:
    return StoredUpstream(name, Source.ADMIN.value, True, json.dumps(settings), None)


class JSONReadingTests(SynchronousTestCase):
    def test_same_messages_as_the_file(self) -> None:
        """A bad value in JSON is refused with the message the file gives for it."""
        cases = [
            # key, as YAML writes it, as JSON gives it, the key the error names
            ("timeout", "'3'", "3", "timeout"),
            ("timeout", "-1", -1, "timeout"),
            ("timeout", "true", True, "timeout"),
            ("allow", "[3]", [3], "allow[0]"),
            ("type", "nonsense", "nonsense", "type"),
            ("noauth", "'yes'", "yes", "noauth"),
            ("endpoint", "ftp://x.test", "ftp://x.test", "endpoint"),
        ]
        for key, yaml_value, json_value, named in cases:
            settings = {"endpoint": "https://a.test/v1", key: json_value}
            with self.assertRaises(ConfigError) as from_json:
                read_json_section(settings, Upstream, "an upstream mapping", where="body")
            written = {"endpoint": "https://a.test/v1", key: yaml_value}
            lines = "".join(f"    {k}: {v}\n" for k, v in written.items())
            with self.assertRaises(ConfigError) as from_file:
                make_config("upstreams:\n  - name: a\n" + lines)
            self.assertEqual(from_json.exception.message, from_file.exception.message, key)
            self.assertEqual(from_json.exception.key, named)
            self.assertEqual(from_file.exception.key, f"upstreams[0].{named}")

    def test_unknown_key_named(self) -> None:
        """An unknown key is refused by name, with the near one suggested."""
        with self.assertRaises(ConfigError) as caught:
            read_json_section({"endpont": "x"}, Upstream, "an upstream mapping", where="body")
        self.assertEqual(caught.exception.key, "endpont")
        self.assertIn("did you mean 'endpoint'?", caught.exception.message)

    def test_literal_text(self) -> None:
        """${NAME} in JSON is text, never an environment variable."""
        values = read_json_section(
            {"endpoint": "https://a.test/v1", "sk": "${HOME}"},
            Upstream,
            "an upstream mapping",
            where="body",
        )
        self.assertEqual(values["sk"], "${HOME}")

    def test_partial_and_loader_keys(self) -> None:
        """A partial read takes only the keys given; keys only the file can set are refused."""
        self.assertEqual(
            read_json_section({"timeout": 2}, Upstream, "x", where="b", partial=True),
            {"timeout": 2.0},
        )
        with self.assertRaises(ConfigError) as caught:
            read_json_section({"authorization": "k"}, Upstream, "x", where="b", partial=True)
        self.assertEqual(caught.exception.key, "authorization")

    def test_a_new_field_needs_no_admin_code(self) -> None:
        """A key the model gains is read from JSON and shown, with no change here."""

        @frozen
        class Grown:
            backup: bool = field(default=False, metadata=read(boolean))
            secret: str | None = field(default=None, repr=False, metadata=read(boolean))

        values = read_json_section({"backup": True}, Grown, "x", where="b")
        self.assertEqual(settings_json(Grown(**values)), {"backup": True, "secret_set": False})


class OverlayTests(SynchronousTestCase):
    def test_admin_upstream_follows_the_file(self) -> None:
        """A stored upstream comes after the file's, with the top-level deadlines."""
        stored = StoreSnapshot(1, (admin_row("extra", endpoint="https://extra.test/v1"),))
        config = overlay(file_config(), stored, Sealer(None))
        self.assertEqual([u.name for u in config.upstreams], ["main", "guarded", "extra"])
        self.assertEqual(config.upstreams[2].timeout, 50.0)

    def test_config_row_changes_only_its_keys(self) -> None:
        """A row of source config changes the keys it holds, the rest as the file says."""
        row = StoredUpstream("main", Source.CONFIG.value, True, '{"timeout": 7}', None)
        main = overlay(file_config(), StoreSnapshot(1, (row,)), Sealer(None)).upstreams[0]
        self.assertEqual((main.timeout, main.sk), (7.0, "sk-main-0123456789"))

    def test_disabled_upstream_keeps_its_keys(self) -> None:
        """Disabling the upstream that names the only keys never opens the proxy."""
        text = """
upstreams:
  - {name: only, endpoint: https://only.test/v1, authorization: {guest: ck-guest-0123456789}}
  - {name: other, endpoint: https://other.test/v1}
"""
        row = StoredUpstream("only", Source.CONFIG.value, False, "{}", None)
        config = overlay(file_config(text), StoreSnapshot(1, (row,)), Sealer(None))
        self.assertEqual([u.name for u in config.upstreams], ["other"])
        router = Router(config)
        self.assertTrue(router.auth_required)
        self.assertEqual(
            router.authenticate(None).refusal, "authorization header should start with 'Bearer'"
        )
        guest = router.authenticate(b"Bearer ck-guest-0123456789")
        self.assertEqual(guest.key.name if guest.key else None, "guest")
        refused = router.candidates(guest, "m", "/v1/chat/completions")
        self.assertEqual(getattr(refused, "status", None), 403)

    def test_stored_key_by_hash(self) -> None:
        """A stored key is known by its SHA-256 and may use the upstreams it lists."""
        secret = new_key_secret()
        row = StoredKey("bob", key_digest(secret), "{}", '["guarded"]', 1.0)
        config = overlay(file_config(), StoreSnapshot(1, keys=(row,)), Sealer(None))
        router = Router(config)
        bob = router.authenticate(b"Bearer " + secret.encode())
        assert bob.key is not None
        self.assertIsNone(bob.key.secret)
        candidates = router.candidates(bob, "m", "/v1/chat/completions")
        self.assertEqual([u.name for u in candidates], ["guarded"])  # type: ignore[union-attr]
        guest = router.authenticate(b"Bearer ck-guest-0123456789")
        candidates = router.candidates(guest, "m", "/v1/chat/completions")
        self.assertEqual([u.name for u in candidates], ["guarded"])  # type: ignore[union-attr]

    def test_stored_key_of_gone_upstreams(self) -> None:
        """A stored key whose upstreams are gone stays a valid key: 403, not 401, and listed."""
        secret = new_key_secret()
        row = StoredKey("bob", key_digest(secret), "{}", '["gone"]', 1.0)
        config = overlay(file_config(), StoreSnapshot(1, keys=(row,)), Sealer(None))
        router = Router(config)
        bob = router.authenticate(b"Bearer " + secret.encode())
        refused = router.candidates(bob, "m", "/v1/chat/completions")
        self.assertEqual(getattr(refused, "status", None), 403)
        self.assertIn("bob", [key.name for key in all_client_keys(config)])

    def test_conflicts_refused(self) -> None:
        """An admin row named like a file upstream, a key named like a file key: refused."""
        with self.assertRaises(ConfigError) as caught:
            overlay(
                file_config(),
                StoreSnapshot(1, (admin_row("main", endpoint="https://x"),)),
                Sealer(None),
            )
        self.assertEqual(caught.exception.key, "oaproxy_upstreams[main].name")
        key = StoredKey("alice", "0" * 64, "{}", None, 1.0)
        with self.assertRaises(ConfigError) as caught:
            overlay(file_config(), StoreSnapshot(1, keys=(key,)), Sealer(None))
        self.assertEqual(caught.exception.key, "oaproxy_keys[alice].name")

    def test_bad_row_named(self) -> None:
        """A row edited by hand into nonsense names its table, row and key."""
        row = admin_row("extra", endpoint="https://x.test/v1", timeout="soon")
        with self.assertRaises(ConfigError) as caught:
            overlay(file_config(), StoreSnapshot(1, (row,)), Sealer(None))
        self.assertEqual(
            str(caught.exception),
            "the store: oaproxy_upstreams[extra].timeout: expected a number, got a string",
        )
        plain = admin_row("extra", endpoint="https://x.test/v1", sk="sk-plain-0123456789")
        with self.assertRaises(ConfigError) as caught:
            overlay(file_config(), StoreSnapshot(1, (plain,)), Sealer(None))
        self.assertEqual(caught.exception.key, "oaproxy_upstreams[extra].sk")


class DescribeTests(SynchronousTestCase):
    def test_never_the_sk(self) -> None:
        """An upstream shows sk_set, never its key; a URL's password is hidden (a
        proxy's: an endpoint cannot have one)."""
        config = make_config(
            "upstreams: [{name: a, endpoint: 'https://a.test/v1', sk: sk-0123456789,"
            " proxy: 'http://u:pw-0123456789@proxy.test:3128'}]"
        )
        shown = describe_upstream(config.upstreams[0], stored=EMPTY, state=None)
        text = json.dumps(shown)
        self.assertNotIn("sk-0123456789", text)
        self.assertNotIn("pw-0123456789", text)
        self.assertTrue(shown["settings"]["sk_set"])
        self.assertEqual(shown["source"], "config")
        self.assertEqual(shown["settings"]["proxy"], "http://proxy.test:3128")
        self.assertTrue(shown["settings"]["proxy_credentials_set"])

    def test_every_file_key_shown(self) -> None:
        """Every key of an upstream appears in its settings (secret ones as <key>_set)."""
        upstream = file_config().upstreams[0]
        shown = describe_upstream(upstream, stored=EMPTY, state=None)["settings"]
        expected = {key if field.repr else f"{key}_set" for field, key, _ in file_fields(Upstream)}
        self.assertEqual(set(shown), expected - {"name"})

    def test_key_scopes(self) -> None:
        """A global key may use every open upstream (null), a scoped one its list."""
        config = file_config()
        shown = {k.name: describe_key(k, config, EMPTY) for k in all_client_keys(config)}
        self.assertIsNone(shown["alice"]["upstreams"])
        self.assertEqual(shown["guest"]["upstreams"], ["guarded"])
        self.assertNotIn("key", shown["guest"]["settings"])

    def test_public_text(self) -> None:
        """Shown text loses a URL's password and anything shaped like a key."""
        self.assertEqual(public_text("http://u:p@h:1/x"), "http://u:[redacted]@h:1/x")
        self.assertEqual(public_text("key sk-abcdef123456"), "key [redacted]")


class SealingTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """What is sealed with store_key opens with it, and with no other."""
        sealer = Sealer.from_config(file_config())
        sealed = sealer.seal({"sk": "sk-secret"})
        self.assertNotIn("sk-secret", sealed)
        self.assertEqual(sealer.unseal(sealed), {"sk": "sk-secret"})
        other = Sealer.from_config(make_config(FILE.replace(STORE_KEY, "x" * 43 + "=")))
        self.assertRaises(SealingError, other.unseal, sealed)

    def test_no_store_key(self) -> None:
        """Without store_key nothing secret is stored, and the message says why."""
        with self.assertRaises(SealingError) as caught:
            Sealer(None).seal({"sk": "x"})
        self.assertIn("store_key", str(caught.exception))

    def test_bad_store_key(self) -> None:
        """A store_key that is no Fernet key is a config error naming it."""
        with self.assertRaises(ConfigError) as caught:
            Sealer.from_config(make_config(FILE.replace(STORE_KEY, "too-short")))
        self.assertEqual(caught.exception.key, "store_key")


class ChangeTests(SynchronousTestCase):
    def refused(self, decide: Any, stored: StoreSnapshot = EMPTY) -> Refusal:
        with self.assertRaises(Refusal) as caught:
            decide(stored)
        return caught.exception

    def test_add_upstream(self) -> None:
        """A new upstream is stored with its sk sealed; the audit says "set"."""
        change = add_upstream(
            context(), {"name": "extra", "endpoint": "https://x.test/v1", "sk": "sk-extra-012345"}
        )(EMPTY)
        [write] = change.writes
        assert isinstance(write, PutUpstream)
        self.assertNotIn("sk-extra", write.row.settings)
        self.assertNotIn("sk-extra", json.dumps(change.audit.changes))
        self.assertEqual(json.loads(change.audit.changes)["sk"], "set")
        config = overlay(file_config(), applied(EMPTY, change), Sealer.from_config(file_config()))
        self.assertEqual(config.upstreams[-1].sk, "sk-extra-012345")

    def test_add_refusals(self) -> None:
        """A bad field (400, named), a taken name (409), an sk without store_key (400)."""
        bad = self.assertRaises(
            Refusal,
            add_upstream,
            context(),
            {"name": "x", "endpoint": "https://x", "timeout": 0.0 - 1},
        )
        self.assertEqual((bad.kind, bad.param), (RefusalKind.INVALID, "timeout"))
        taken = self.refused(add_upstream(context(), {"name": "main", "endpoint": "https://x"}))
        self.assertEqual(taken.kind, RefusalKind.CONFLICT)
        bare = make_config(FILE.replace(f"store_key: {STORE_KEY}", ""))
        no_key = self.assertRaises(
            Refusal, add_upstream, context(bare), {"name": "x", "endpoint": "https://x", "sk": "k"}
        )
        self.assertEqual(
            (no_key.kind, no_key.param, no_key.code),
            (RefusalKind.INVALID, "sk", "store_key_missing"),
        )
        self.assertIn("store_key", no_key.message)

    def test_change_and_disable_a_file_upstream(self) -> None:
        """A file upstream is changed by an overlay row, which goes once it changes nothing."""
        stored = applied(EMPTY, change_upstream(context(), "main", {"timeout": 9})(EMPTY))
        self.assertEqual(stored.upstreams[0].source, "config")
        stored = applied(stored, set_enabled(context(), "main", False)(stored))
        stored = applied(stored, change_upstream(context(), "main", {"timeout": None})(stored))
        self.assertEqual(stored.upstreams[0].settings, "{}")
        self.assertFalse(stored.upstreams[0].enabled)
        stored = applied(stored, set_enabled(context(), "main", True)(stored))
        self.assertEqual(stored.upstreams, ())

    def test_remove(self) -> None:
        """A file upstream cannot be removed (409), an unknown one is 404."""
        self.assertEqual(
            self.refused(remove_upstream(context(), "main")).kind, RefusalKind.CONFLICT
        )
        self.assertEqual(
            self.refused(remove_upstream(context(), "nope")).kind, RefusalKind.NOT_FOUND
        )
        stored = StoreSnapshot(1, (admin_row("extra", endpoint="https://x"),))
        self.assertEqual(
            remove_upstream(context(), "extra")(stored).writes, (DropUpstream("extra"),)
        )

    def test_keys(self) -> None:
        """A key is stored as its SHA-256; its upstreams must exist; a file key stays."""
        secret = new_key_secret()
        change = add_key(context(), {"name": "bob", "rate_limit": "10/minute"}, secret)(EMPTY)
        [write] = change.writes
        assert isinstance(write, PutKey)
        self.assertEqual(write.row.sha256, key_digest(secret))
        self.assertNotIn(secret, repr(change))
        unknown = self.refused(add_key(context(), {"name": "c", "upstreams": ["nope"]}, secret))
        self.assertEqual((unknown.kind, unknown.param), (RefusalKind.INVALID, "upstreams[0]"))
        bad = self.assertRaises(
            Refusal, add_key, context(), {"name": "c", "rate_limit": "often"}, secret
        )
        self.assertEqual(bad.param, "rate_limit")
        self.assertEqual(
            self.refused(add_key(context(), {"name": "alice"}, secret)).kind, RefusalKind.CONFLICT
        )
        self.assertEqual(self.refused(remove_key(context(), "alice")).kind, RefusalKind.CONFLICT)


class ActivityTests(SynchronousTestCase):
    def test_recent_attempts_and_state(self) -> None:
        """Attempts count for five minutes; in flight and the TTFB average are the
        balancing's, the circuit the breakers'."""
        clock = Clock()
        recent = RecentAttempts(clock)
        load = UpstreamLoad()
        circuits = Circuits(clock)
        readiness = Readiness(clock, circuits)
        watching = Observers([LoadFollowing(load), recent])
        exchange = bare_exchange()

        def state() -> UpstreamState:
            return upstream_state(
                "a", recent=recent, load=load, circuits=circuits, readiness=readiness
            )

        attempt = AttemptLog("a", clock.seconds())
        watching.attempt_started(exchange, attempt)
        self.assertEqual(state().in_flight, 1)
        attempt.ttfb, attempt.duration = 1.0, 1.0
        watching.attempt_finished(exchange, attempt)
        self.assertEqual(state().in_flight, 0)
        failed = AttemptLog("a", clock.seconds(), ttfb=2.0, duration=2.0)
        failed.failed(FailureKind.TIMEOUT, "deadline")
        gone = AttemptLog("a", clock.seconds(), duration=0.1)
        gone.failed(FailureKind.CANCELLED, "client disconnected")
        for later in (failed, gone):
            watching.attempt_started(exchange, later)
            watching.attempt_finished(exchange, later)
        self.assertEqual(recent.recent("a"), (1, 1))
        self.assertAlmostEqual(state().ttfb_average or 0, 1.0 + LATENCY_WEIGHT * (2.0 - 1.0))
        clock.advance(RECENT - 20)
        self.assertEqual(recent.recent("a"), (1, 1))
        clock.advance(40)
        self.assertEqual(recent.recent("a"), (0, 0))
        now = state()
        self.assertEqual(
            (now.circuit.state, now.failing, now.in_flight), (CircuitState.CLOSED, False, 0)
        )


class SummaryTests(SynchronousTestCase):
    def test_admin_line(self) -> None:
        """The startup summary says whether /admin/ is on; it warns when served without TLS."""
        config = make_config(FILE + "admin_key: adm-0123456789abcdef\n")
        loopback = "\n".join(summary(config, ["tcp:8888:interface=127.0.0.1"], [], []))
        self.assertIn("admin API: on, at /admin/; store_key set", loopback)
        self.assertNotIn("WARNING", loopback)
        public = "\n".join(summary(config, ["tcp:8888:interface=0.0.0.0"], [], []))
        self.assertIn("WARNING: served without TLS on tcp:8888:interface=0.0.0.0", public)
        self.assertNotIn("adm-0123456789abcdef", public)
        self.assertIn("admin API: off", "\n".join(summary(file_config(), [], [], [])))

    def test_disabled_upstream_line(self) -> None:
        """A disabled upstream is named as such."""
        row = StoredUpstream("main", Source.CONFIG.value, False, "{}", None)
        config = overlay(file_config(), StoreSnapshot(1, (row,)), Sealer(None))
        self.assertIn("upstream main: disabled (enabled: false)", summary(config, [], [], []))
