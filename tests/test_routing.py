"""Tests for oaproxy.routing: client keys, allow/deny, key scopes, routes, aliases."""

from __future__ import annotations

import hmac
import json

from twisted.trial.unittest import SynchronousTestCase

from oaproxy import routing
from oaproxy.config import Upstream
from oaproxy.errors import ErrorAnswer
from oaproxy.routing import NOT_BEARER, WRONG_KEY, Caller, Router, serves
from tests.doubles import make_config

CONFIG = """
authorization: {alice: sk-alice-0001, bob: sk-bob-00002}
upstreams:
  - name: main
    endpoint: https://main.test/v1
    sk: sk-up-main
    allow: [gpt-4o, gpt-4o-mini, /v1/audio/transcriptions]
    deny: [gpt-4o]
  - name: spare
    endpoint: https://spare.test/v1
    sk: sk-up-spare
    deny: [o1, llama-3]
  - name: guests
    endpoint: https://guests.test/v1
    sk: sk-up-guests
    authorization: {guest: sk-guest-0003}
    allow: [gpt-4o-mini, llama-3]
  - name: public
    endpoint: https://public.test/v1
    noauth: true
    allow: [tinyllama, gpt-4o-mini]
"""


def names(result: list[Upstream] | ErrorAnswer) -> list[str]:
    assert isinstance(result, list), result
    return [u.name for u in result]


class AuthenticateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.router = Router(make_config(CONFIG))

    def test_valid_keys(self) -> None:
        """Each configured key, global or scoped to an upstream, names its
        caller; spaces around the key after 'Bearer' are trimmed as
        openai-api-route does."""
        for header, name in [
            (b"Bearer sk-alice-0001", "alice"),
            (b"Bearer sk-bob-00002", "bob"),
            (b"Bearer sk-guest-0003", "guest"),
            # openai-api-route trims the spaces after "Bearer".
            (b"Bearer   sk-alice-0001  ", "alice"),
        ]:
            caller = self.router.authenticate(header)
            self.assertIsNotNone(caller.key, header)
            assert caller.key is not None
            self.assertEqual((caller.key.name, caller.refusal), (name, None), header)

    def test_not_bearer(self) -> None:
        """No header, an empty one, another scheme, a lower-case 'bearer' or a
        bare key are all refused as not bearer."""
        for header in [
            None,
            b"",
            b"Basic c2stYWxpY2UtMDAwMQ==",
            b"bearer sk-alice-0001",
            b"sk-alice-0001",
        ]:
            self.assertEqual(
                self.router.authenticate(header), Caller(key=None, refusal=NOT_BEARER), header
            )
        self.assertEqual(NOT_BEARER, "authorization header should start with 'Bearer'")

    def test_wrong_keys(self) -> None:
        """Wrong keys of the same length, with the same prefix, or a prefix
        or extension of a real key are all refused."""
        for presented in [
            b"sk-alice-0002",  # same length, last byte differs
            b"sk-alice-000",  # a prefix of a key
            b"sk-alice-00011",  # a key plus one byte
            b"tk-alice-0001",  # first byte differs
            b"sk-up-main",  # an upstream's key is not a client key
            b"",
        ]:
            self.assertEqual(
                self.router.authenticate(b"Bearer " + presented),
                Caller(key=None, refusal=WRONG_KEY),
                presented,
            )
        self.assertEqual(WRONG_KEY, "wrong authorization header")

    def test_compare_digest_confirms_the_lookup(self) -> None:
        """A presented key whose digest finds a configured key is still
        compared in full, with hmac.compare_digest, before it is accepted."""
        compared: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", spy)
        # Every secret hashes alike: the lookup finds a key for any input.
        self.patch(routing, "_digest", lambda secret: b"collision")
        router = Router(
            make_config("authorization: sk-alice-0001\nupstreams: [{endpoint: https://a.test}]\n")
        )
        self.assertEqual(
            router.authenticate(b"Bearer sk-alice-0002"), Caller(key=None, refusal=WRONG_KEY)
        )
        self.assertEqual(compared, [(b"sk-alice-0001", b"sk-alice-0002")])
        caller = router.authenticate(b"Bearer sk-alice-0001")
        assert caller.key is not None
        self.assertEqual(caller.key.secret, "sk-alice-0001")
        self.assertEqual(len(compared), 2)

    def test_no_keys_is_open(self) -> None:
        """Without keys anywhere the proxy is open: any header or none is a
        keyless caller who may use every upstream."""
        router = Router(
            make_config(
                "upstreams: [{endpoint: https://a.test/v1}, {endpoint: https://b.test/v1}]\n"
            )
        )
        self.assertFalse(router.auth_required)
        for header in [None, b"Bearer whatever", b"Basic x"]:
            caller = router.authenticate(header)
            self.assertEqual(caller, Caller(key=None))
            self.assertEqual(
                names(router.candidates(caller, "any-model", "/v1/chat/completions")),
                ["a.test", "b.test"],
            )


class CandidateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.router = Router(make_config(CONFIG))

    def caller(self, key: str | None) -> Caller:
        return self.router.authenticate(None if key is None else b"Bearer " + key.encode())

    def test_table(self) -> None:
        """Who gets which upstreams, in order, for which model or path."""
        alice, guest = "sk-alice-0001", "sk-guest-0003"
        table: list[tuple[str | None, str | None, str, list[str] | tuple[int, str | None]]] = [
            # Global keys: main denies gpt-4o although it allows it (allow, then deny).
            (alice, "gpt-4o", "/v1/chat/completions", ["spare"]),
            (alice, "gpt-4o-mini", "/v1/chat/completions", ["main", "spare", "public"]),
            # Not on main's allow list; spare has no allow list, only a deny.
            (alice, "gpt-3.5-turbo", "/v1/chat/completions", ["spare"]),
            # Only the guests upstream serves llama-3, and alice's key is not scoped to it.
            (alice, "llama-3", "/v1/chat/completions", (403, "model_not_allowed")),
            # Denied by spare, allowed nowhere else (unlike llama-3 above).
            (alice, "o1", "/v1/chat/completions", (404, "model_not_found")),
            # A scoped key: only its own upstream, plus noauth ones.
            (guest, "gpt-4o-mini", "/v1/chat/completions", ["guests", "public"]),
            (guest, "llama-3", "/v1/chat/completions", ["guests"]),
            (guest, "gpt-3.5-turbo", "/v1/chat/completions", (403, "model_not_allowed")),
            (guest, "tinyllama", "/v1/chat/completions", ["public"]),
            # No model (a multipart body): the path stands in for it.
            (alice, None, "/v1/audio/transcriptions", ["main", "spare"]),
            (guest, None, "/v1/audio/transcriptions", (403, "model_not_allowed")),
            (alice, None, "/v1/images/edits", ["spare"]),
            # No key: noauth upstreams only, else the refusal.
            (None, "tinyllama", "/v1/chat/completions", ["public"]),
            (None, "gpt-4o-mini", "/v1/chat/completions", ["public"]),
            (None, "gpt-3.5-turbo", "/v1/chat/completions", (401, "invalid_api_key")),
            (None, "o1", "/v1/chat/completions", (401, "invalid_api_key")),
            ("sk-wrong-0001", "tinyllama", "/v1/chat/completions", ["public"]),
            ("sk-wrong-0001", "gpt-4o", "/v1/chat/completions", (401, "invalid_api_key")),
        ]
        for key, model, path, expected in table:
            result = self.router.candidates(self.caller(key), model, path)
            where = (key, model, path)
            if isinstance(expected, list):
                self.assertEqual(names(result), expected, where)
            else:
                assert isinstance(result, ErrorAnswer), (where, result)
                self.assertEqual((result.status, result.code), expected, where)

    def test_refusal_texts(self) -> None:
        """A missing or wrong key is refused with OpenAI's 401 error body and the reason."""
        missing = self.router.candidates(self.caller(None), "gpt-4", "/v1/chat/completions")
        self.assertEqual(
            missing,
            ErrorAnswer(
                401, "authorization header should start with 'Bearer'", code="invalid_api_key"
            ),
        )
        wrong = self.router.candidates(self.caller("sk-nope"), "gpt-4", "/v1/chat/completions")
        self.assertEqual(
            wrong, ErrorAnswer(401, "wrong authorization header", code="invalid_api_key")
        )
        self.assertEqual(
            json.loads(wrong.body()) if isinstance(wrong, ErrorAnswer) else None,
            {
                "error": {
                    "message": "wrong authorization header",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        )

    def test_403_and_404_answers(self) -> None:
        """A model the key may not use is a 403; a model or path that nothing
        serves is a 404 saying which."""
        forbidden = self.router.candidates(
            self.caller("sk-alice-0001"), "llama-3", "/v1/chat/completions"
        )
        self.assertEqual(
            forbidden,
            ErrorAnswer(
                403,
                "This key is not allowed to use llama-3.",
                type="permission_error",
                code="model_not_allowed",
            ),
        )
        missing = self.router.candidates(self.caller("sk-alice-0001"), "o1", "/v1/chat/completions")
        self.assertEqual(
            missing,
            ErrorAnswer(
                404,
                "The model `o1` does not exist or is not served by this proxy.",
                code="model_not_found",
                param="model",
            ),
        )
        path = Router(
            make_config(CONFIG.replace("    deny: [o1, llama-3]\n", "    allow: [x]\n"))
        ).candidates(self.caller("sk-alice-0001"), None, "/v1/files")
        self.assertEqual(
            path,
            ErrorAnswer(
                404,
                "The path `/v1/files` does not exist or is not served by this proxy.",
                code="model_not_found",
            ),
        )

    def test_noauth_only_without_key(self) -> None:
        """Without noauth upstreams a keyless request is refused whatever the model."""
        router = Router(make_config(CONFIG.replace("    noauth: true\n", "")))
        for key, refusal in [(None, NOT_BEARER), ("sk-wrong", WRONG_KEY)]:
            caller = router.authenticate(None if key is None else b"Bearer " + key.encode())
            self.assertEqual(
                router.candidates(caller, "tinyllama", "/v1/chat/completions"),
                ErrorAnswer(401, refusal, code="invalid_api_key"),
            )

    def test_global_keys_do_not_reach_scoped_upstreams(self) -> None:
        """A global key never reaches an upstream scoped to its own keys, and a
        scoped key reaches only its upstream."""
        config = make_config(
            """
authorization: sk-global
upstreams:
  - {name: scoped, endpoint: https://s.test/v1, authorization: [sk-scoped]}
  - {name: open, endpoint: https://o.test/v1}
"""
        )
        router = Router(config)
        glob = router.authenticate(b"Bearer sk-global")
        scoped = router.authenticate(b"Bearer sk-scoped")
        self.assertEqual(names(router.candidates(glob, "m", "/v1/x")), ["open"])
        self.assertEqual(names(router.candidates(scoped, "m", "/v1/x")), ["scoped"])

    def test_scoped_keys_alone_require_auth(self) -> None:
        """Keys only on an upstream still make the proxy require a key."""
        router = Router(
            make_config(
                "upstreams: [{name: s, endpoint: https://s.test/v1, authorization: sk-s}]\n"
            )
        )
        self.assertTrue(router.auth_required)
        self.assertEqual(
            router.candidates(router.authenticate(None), "m", "/v1/x"),
            ErrorAnswer(401, NOT_BEARER, code="invalid_api_key"),
        )
        self.assertEqual(
            names(router.candidates(router.authenticate(b"Bearer sk-s"), "m", "/v1/x")), ["s"]
        )


class OrderTests(SynchronousTestCase):
    UPSTREAMS = "".join(f"  - {{name: u{i}, endpoint: https://u{i}.test/v1}}\n" for i in range(6))

    def test_candidates_in_config_order(self) -> None:
        """The router keeps the config's order: the balancing policy is a
        candidate filter of its own (tests/test_balancing.py)."""
        router = Router(make_config("upstreams:\n" + self.UPSTREAMS))
        for _ in range(3):
            self.assertEqual(
                names(router.candidates(Caller(None), "m", "/v1/x")), [f"u{i}" for i in range(6)]
            )


class ServesTests(SynchronousTestCase):
    def upstream(self, allow: str, deny: str) -> Upstream:
        config = make_config(
            f"upstreams: [{{endpoint: https://a.test/v1, allow: {allow}, deny: {deny}}}]\n"
        )
        return config.upstreams[0]

    def test_allow_then_deny(self) -> None:
        """An upstream serves a name its allow list admits (an empty one admits
        all) and its deny list does not name; names match exactly."""
        table = [
            ("[]", "[]", "m", True),
            ("[m]", "[]", "m", True),
            ("[m]", "[]", "n", False),
            ("[m]", "[m]", "m", False),
            ("[]", "[m]", "m", False),
            ("[]", "[m]", "n", True),
            ("[m, n]", "[n]", "n", False),
            ("[m, n]", "[n]", "m", True),
            ("[/v1/audio/speech]", "[]", "/v1/audio/speech", True),
            ("[/v1/audio/speech]", "[]", "/v1/audio/speech/x", False),
            # Names are exact: no prefix or case folding.
            ("[gpt-4]", "[]", "gpt-4o", False),
            ("[gpt-4]", "[]", "GPT-4", False),
        ]
        for allow, deny, name, expected in table:
            self.assertEqual(
                serves(self.upstream(allow, deny), name), expected, (allow, deny, name)
            )
