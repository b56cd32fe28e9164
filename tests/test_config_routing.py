"""The config keys of routing: routes, breakers, upstream types, aliases, enabled."""

from __future__ import annotations

from types import MappingProxyType

from oaproxy.config import BreakerConfig, LbPolicy, RouteSettings, UpstreamType
from oaproxy.paths import request_path
from tests.test_config import MINIMAL, Helpers, parse


class RouteTests(Helpers):
    def test_route_and_its_policy(self) -> None:
        """An upstream's route and the route's own policy; /v1 keeps the global one."""
        config = parse(
            """\
            lb_policy: round_robin
            routes:
              /ollama: {lb_policy: least_busy}
              /team/a/: {}
            upstreams:
              - {endpoint: "http://o/v1", route: /ollama}
              - {endpoint: "http://t/v1", route: /team/a/}
              - {endpoint: "http://p/v1"}
            """
        )
        self.assertEqual([u.route for u in config.upstreams], ["/ollama", "/team/a", None])
        self.assertEqual(config.route_prefixes, ("/ollama", "/team/a"))
        self.assertEqual(
            dict(config.routes),
            {"/ollama": RouteSettings(LbPolicy.LEAST_BUSY), "/team/a": RouteSettings(None)},
        )
        self.assertIs(config.lb_policy_for("/ollama"), LbPolicy.LEAST_BUSY)
        self.assertIs(config.lb_policy_for("/team/a"), LbPolicy.ROUND_ROBIN)
        self.assertIs(config.lb_policy_for(None), LbPolicy.ROUND_ROBIN)

    def test_route_prefixes_longest_first(self) -> None:
        """Route prefixes come longest first, so that /team/a is matched before /team."""
        config = parse(
            "upstreams:\n"
            "  - {endpoint: 'http://t/v1', route: /team}\n"
            "  - {endpoint: 'http://a/v1', route: /team/a}\n"
        )
        self.assertEqual(config.route_prefixes, ("/team/a", "/team"))
        where = request_path(b"/team/a/v1/models", config.route_prefixes)
        self.assertEqual(where.route if where is not None else None, "/team/a")

    def test_bad_routes(self) -> None:
        """A route is plain path segments, not one of oaproxy's own paths."""
        for route, message in [
            ("ollama", "a route is a path such as /ollama"),
            ("/", "a route is a path such as /ollama"),
            ("/a b", "a route is a path such as /ollama"),
            ("/a/../b", "a route is a path such as /ollama"),
            ("/a//b", "a route is a path such as /ollama"),
            ("/%61", "a route is a path such as /ollama"),
            ("/v1", "/v1 is a path oaproxy serves itself"),
            ("/admin/x", "/admin is a path oaproxy serves itself"),
            ("/metrics", "/metrics is a path oaproxy serves itself"),
        ]:
            self.fails(
                f"upstreams:\n  - endpoint: http://a/v1\n    route: '{route}'\n",
                3,
                "upstreams[0].route",
                message,
            )

    def test_routes_need_an_upstream(self) -> None:
        """Settings for a route no upstream serves are a mistake."""
        self.fails(
            "routes:\n  /olama: {lb_policy: random}\n"
            "upstreams:\n  - {endpoint: 'http://a/v1', route: /ollama}\n",
            2,
            "routes./olama",
            "no upstream has route: /olama",
        )

    def test_route_settings_are_checked(self) -> None:
        """A route's settings are read like any section: bad values and unknown keys are refused."""
        self.fails(
            "routes:\n  /o: {lb_policy: fastest}\nupstreams:\n  - {endpoint: 'http://a/v1', route: /o}\n",
            2,
            "routes./o.lb_policy",
            "unknown value 'fastest'",
        )
        self.fails(
            "routes:\n  /o: {policy: random}\nupstreams:\n  - {endpoint: 'http://a/v1', route: /o}\n",
            2,
            "routes./o.policy",
            "unknown key 'policy'",
        )


class BreakerTests(Helpers):
    def test_values(self) -> None:
        """The breaker block's three keys, as given."""
        config = parse(
            "redis: redis://127.0.0.1:6379/0\nbreaker: {failures: 2, cooldown: 0.5, shared: true}\n"
            + MINIMAL
        )
        self.assertEqual(config.breaker, BreakerConfig(failures=2, cooldown=0.5, shared=True))

    def test_shared_needs_redis(self) -> None:
        """Shared state needs somewhere to be shared."""
        self.fails(
            "breaker:\n  shared: true\n" + MINIMAL,
            1,
            "breaker.shared",
            "the top-level redis:, which is not set",
        )

    def test_bad_values(self) -> None:
        """Breaker values are checked, and misspelt keys named."""
        self.fails("breaker: {failures: 0}\n" + MINIMAL, 1, "breaker.failures", "greater than 0")
        self.fails("breaker: {cooldown: -1}\n" + MINIMAL, 1, "breaker.cooldown", "greater than 0")
        self.fails("breaker: {failure: 3}\n" + MINIMAL, 1, "breaker.failure", "did you mean")


class UpstreamTypeTests(Helpers):
    def test_echo_needs_nothing(self) -> None:
        """An echo upstream has no endpoint nor key; its name defaults to echo."""
        config = parse("upstreams:\n  - type: echo\n  - type: echo\n")
        first, second = config.upstreams
        self.assertEqual(
            (first.name, first.type, first.endpoint), ("echo", UpstreamType.ECHO, None)
        )
        self.assertEqual(second.name, "echo#2")
        self.assertTrue(first.stream_usage)
        self.assertEqual(first.url(b"/chat/completions"), b"/chat/completions")

    def test_echo_refuses_endpoint_and_key(self) -> None:
        """Given, they would say the answers come from somewhere."""
        self.fails(
            "upstreams:\n  - type: echo\n    endpoint: http://a/v1\n",
            3,
            "upstreams[0].endpoint",
            "an echo upstream answers by itself: it has no endpoint",
        )
        self.fails(
            "upstreams:\n  - type: echo\n    sk: sk-x\n",
            3,
            "upstreams[0].sk",
            "it has no sk",
        )

    def test_openai_needs_an_endpoint(self) -> None:
        """Only replicate and echo upstreams may leave out the endpoint."""
        self.fails("upstreams:\n  - type: openai\n", 2, "upstreams[0].endpoint", "no endpoint")


class AliasTests(Helpers):
    def test_models(self) -> None:
        """``models`` maps client-facing names to the upstream's own."""
        config = parse(
            "upstreams:\n  - endpoint: http://a/v1\n"
            "    models: {gpt-4o: my-deployment-4o, fast: llama3:8b}\n"
        )
        upstream = config.upstreams[0]
        self.assertEqual(
            upstream.models,
            MappingProxyType({"gpt-4o": "my-deployment-4o", "fast": "llama3:8b"}),
        )
        self.assertEqual(upstream.upstream_model("gpt-4o"), "my-deployment-4o")
        self.assertEqual(upstream.upstream_model("other"), "other")
        self.assertIsNone(upstream.upstream_model(None))

    def test_bad_models(self) -> None:
        """Aliases are a mapping of model names to non-empty names."""
        self.fails(
            "upstreams:\n  - endpoint: http://a/v1\n    models: [a]\n",
            3,
            "upstreams[0].models",
            "expected a mapping of model names",
        )
        self.fails(
            "upstreams:\n  - endpoint: http://a/v1\n    models:\n      /v1/x: y\n",
            4,
            "upstreams[0].models./v1/x",
            "an alias is a model name",
        )
        self.fails(
            "upstreams:\n  - endpoint: http://a/v1\n    models:\n      a: ''\n",
            4,
            "upstreams[0].models.a",
            "must not be empty",
        )


class EnabledTests(Helpers):
    def test_disabled_left_out(self) -> None:
        """``enabled: false`` keeps an upstream aside: configured, not used."""
        config = parse(
            "upstreams:\n  - {name: a, endpoint: 'http://a/v1', enabled: false}\n"
            "  - {name: b, endpoint: 'http://b/v1', backup: true}\n"
        )
        self.assertEqual([u.name for u in config.upstreams], ["b"])
        self.assertTrue(config.upstreams[0].backup)
        self.assertEqual([u.name for u in config.disabled_upstreams], ["a"])

    def test_every_upstream_disabled(self) -> None:
        """A config whose every upstream is disabled serves nothing: it is refused."""
        self.fails(
            "upstreams:\n  - {endpoint: 'http://a/v1', enabled: false}\n",
            1,
            "upstreams",
            "every upstream has enabled: false",
        )
