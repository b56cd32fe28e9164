"""Tests for ``oaproxy.config``: YAML in, frozen objects or a located error out."""

from __future__ import annotations

import ipaddress
import operator
import os
import socket
from collections.abc import Mapping
from textwrap import dedent
from types import MappingProxyType

from attrs import field, frozen
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.config import (
    DEFAULT_LISTEN,
    BreakerConfig,
    CacheBackend,
    ClientKey,
    Config,
    ConfigError,
    FeishuConfig,
    LbPolicy,
    MatrixConfig,
    NotifyConfig,
    Price,
    RecordsPolicy,
    Upstream,
    UpstreamType,
    all_client_keys,
    check_listeners,
    is_loopback_endpoint,
    key_fingerprint,
    load_config,
    parse_config,
    parse_listen,
    parse_size,
)
from oaproxy.config.nodes import read_document
from oaproxy.config.schema import every_key, named_sections, read, read_section, section
from oaproxy.config.values import integer, number, one_of, text

# openai-api-route's README sample (seeds/000), comments as in the original.
OAR_SAMPLE = """\
authorization: woshimima

# 默认超时时间，默认 120 秒，流式请求是 10 秒
timeout: 120
stream_timeout: 10

# 使用 sqlite 作为数据库储存请求记录
dbtype: sqlite
dbaddr: ./db.sqlite

# 使用 postgres 作为数据库储存请求记录
# dbtype: postgres
# dbaddr: "host=127.0.0.1 port=5432 user=postgres dbname=openai_api_route sslmode=disable password=woshimima"

upstreams:
  - sk: hahaha
    endpoint: "https://localhost:8888/v1"
    allow:
      # whisper 等非 JSON API 识别不到 model，则使用 URL 路径作为模型名称
      - /v1/audio/transcriptions

  - sk: "secret_key_1"
    endpoint: "https://api.openai.com/v2"
    timeout: 120  # 请求超时时间，默认120秒
    stream_timeout: 10  # 如果识别到 stream: true, 则使用该超时时间
    allow:  # 可选的模型白名单
      - gpt-3.5-trubo
      - gpt-3.5-trubo-0613

  # 您可以设置很多个上游，程序将依次按顺序尝试
  - sk: "secret_key_2"
    endpoint: "https://api.openai.com/v1"
    timeout: 30
    deny: 
      - gpt-4
"""

OAR_REPLICATE = """
  - sk: "key_for_replicate"
    type: replicate
    allow:
      - mistralai/mixtral-8x7b-instruct-v0.1
"""

# openai-api-route's "complex" sample (seeds/000).
OAR_COMPLEX = """\
# 默认验证头
authorization: woshimima

upstreams:

  # 允许所有人使用的文字转语音
  - sk: xxx
    endpoint: http://localhost:5000/v1
    noauth: true
    allow:
      - /v1/audio/transcriptions
    
  # guest 专用的 gpt-3.5-turbo-0125 模型
  - sk: 
    endpoint: https://api.xxx.local/v1
    authorization: guest
    allow:
      - gpt-3.5-turbo-0125
"""

MINIMAL = """\
upstreams:
  - endpoint: https://api.openai.com/v1
"""

PATH = "etc/test.yaml"


def parse(text: str, environ: Mapping[str, str] | None = None) -> Config:
    return parse_config(dedent(text), PATH, environ or {})


class Helpers(SynchronousTestCase):
    def fails(
        self,
        text: str,
        line: int | None,
        key: str,
        message: str,
        environ: Mapping[str, str] | None = None,
    ) -> ConfigError:
        """Assert that ``text`` is refused at ``line`` for ``key``, the message
        containing ``message``, the whole error on one line.
        """
        error = self.assertRaises(ConfigError, parse, text, environ)
        self.assertEqual((error.path, error.line, error.key), (PATH, line, key), str(error))
        self.assertIn(message, error.message)
        self.assertNotIn("\n", str(error))
        return error


class ConfigErrorTests(SynchronousTestCase):
    def test_str_with_line(self) -> None:
        """An error reads file:line: key: message, and keeps each part."""
        error = ConfigError("c.yaml", 7, "upstreams[1].timeout", "must be greater than 0")
        self.assertEqual(str(error), "c.yaml:7: upstreams[1].timeout: must be greater than 0")
        self.assertEqual(
            (error.path, error.line, error.key, error.message),
            ("c.yaml", 7, "upstreams[1].timeout", "must be greater than 0"),
        )

    def test_str_without_line(self) -> None:
        """An error without a line reads file: key: message."""
        error = ConfigError("c.yaml", None, "upstreams", "no upstreams are configured")
        self.assertEqual(str(error), "c.yaml: upstreams: no upstreams are configured")

    def test_str_without_key(self) -> None:
        """An error without a key reads file:line: message."""
        self.assertEqual(str(ConfigError("c.yaml", 3, "", "bad")), "c.yaml:3: bad")

    def test_one_line(self) -> None:
        """A message is kept on one line: a newline in it becomes a space."""
        error = ConfigError("c.yaml", 1, "k", "two\nlines")
        self.assertEqual(error.message, "two lines")


class DefaultsTests(SynchronousTestCase):
    def test_top_level_defaults(self) -> None:
        """A config of one upstream gets every top-level default: loopback
        listener, this host's name, no keys, openai-api-route's deadlines,
        sqlite, a 64 MiB body cap, loopback trusted."""
        config = parse(MINIMAL)
        self.assertEqual(config.path, PATH)
        self.assertEqual(config.listen, ("tcp:8888:interface=127.0.0.1",))
        self.assertEqual(config.listen, DEFAULT_LISTEN)
        self.assertEqual(config.hostname, socket.gethostname())
        self.assertEqual(config.keys, ())
        self.assertIsNone(config.admin_key)
        self.assertIsNone(config.metrics_key)
        self.assertEqual(config.timeout, 120.0)
        self.assertEqual(config.stream_timeout, 10.0)
        self.assertEqual(config.stream_idle_timeout, 30.0)
        self.assertEqual(config.retries, 0)
        self.assertEqual(config.retry_backoff, 0.5)
        self.assertEqual(config.max_retry_after, 5.0)
        self.assertEqual(config.failover_codes, ("context_length_exceeded",))
        self.assertEqual(config.lb_policy, "order")
        self.assertEqual(config.dbtype, "sqlite")
        self.assertEqual(config.dbaddr, "./db.sqlite")
        self.assertIsNone(config.redis)
        self.assertEqual(config.max_body_bytes, 67108864)
        self.assertEqual(
            config.trusted_proxies,
            (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        )
        self.assertEqual(config.shutdown_timeout, 30.0)
        self.assertIsNone(config.log_file)
        self.assertEqual(config.records, RecordsPolicy())
        self.assertEqual(config.notify, NotifyConfig(None, None, 60.0, 10.0))
        self.assertEqual(dict(config.prices), {})
        self.assertEqual(config.breaker, BreakerConfig(failures=5, cooldown=30.0, shared=False))
        self.assertEqual(dict(config.routes), {})
        self.assertEqual(config.disabled_upstreams, ())

    def test_records_defaults(self) -> None:
        """RecordsPolicy's defaults: bodies and answers kept, headers not, 64
        KiB a field, daily rotation, the Redis stream, the spool, a 10000-record
        queue."""
        self.assertEqual(
            RecordsPolicy(),
            RecordsPolicy(
                body=True,
                response=True,
                headers=False,
                max_field_bytes=65536,
                file=None,
                rotate="daily",
                redis_key="oaproxy:records",
                redis_maxlen=100000,
                spool_dir="./log/spool",
                queue_size=10000,
            ),
        )

    def test_upstream_defaults(self) -> None:
        """An upstream given only an endpoint is named by its host and gets every default."""
        [upstream] = parse(MINIMAL).upstreams
        self.assertEqual(
            upstream,
            Upstream(
                name="api.openai.com",
                endpoint="https://api.openai.com/v1",
                sk=None,
                type=UpstreamType.OPENAI,
                timeout=120.0,
                stream_timeout=10.0,
                allow=(),
                deny=(),
                keys=None,
                noauth=False,
                keep_header=False,
                weight=1.0,
                stream_usage=True,
            ),
        )

    def test_null_means_default(self) -> None:
        """A key given no value (YAML null) takes its default, at the top level,
        in sections and in upstreams."""
        config = parse(
            """\
            timeout:
            lb_policy:
            records:
            notify:
            listen:
            upstreams:
              - endpoint: http://a
                name:
                sk:
                allow:
                weight:
            """
        )
        self.assertEqual(config.timeout, 120.0)
        self.assertEqual(config.lb_policy, "order")
        self.assertEqual(config.records, RecordsPolicy())
        self.assertEqual(config.listen, DEFAULT_LISTEN)
        self.assertEqual(config.upstreams[0].name, "a")
        self.assertEqual(config.upstreams[0].allow, ())
        self.assertEqual(config.upstreams[0].weight, 1.0)

    def test_every_setting(self) -> None:
        """Every setting, given, lands in its field with its type: numbers as
        floats, a trailing slash dropped from endpoints, yes as true, a lone
        string as a list."""
        config = parse(
            """\
            listen: [tcp:8080:interface=127.0.0.1, unix:/run/oaproxy.sock]
            hostname: edge-1
            authorization: {alice: k1}
            admin_key: adm
            metrics_key: met
            timeout: 60
            stream_timeout: 5.5
            stream_idle_timeout: 90
            lb_policy: random
            dbtype: postgres
            dbaddr: "host=127.0.0.1 port=5432 user=postgres dbname=test"
            redis: redis://127.0.0.1:6379/2
            max_body_bytes: 1048576
            trusted_proxies: [10.0.0.0/8, "::1"]
            shutdown_timeout: 0
            log_file: ./log/oaproxy.jsonl
            records:
              body: false
              response: false
              headers: true
              max_field_bytes: 1024
              file: ./log/records.jsonl
              rotate: 100MB
              redis_key: rk
              redis_maxlen: 50
              spool_dir: /var/spool/oaproxy
              queue_size: 7
            notify:
              feishu: {webhook: "https://open.feishu.cn/open-apis/bot/v2/hook/x", secret: fs}
              matrix:
                homeserver: https://matrix.example.org/
                access_token: tok
                room_id: "!room:example.org"
              min_interval: 0
              timeout: 2.5
            prices:
              gpt-4o-mini: {input: 0.15, output: 0.6}
              gpt-4o: {input: 2.5, output: 10}
            upstreams:
              - name: main
                endpoint: https://api.openai.com/v1/
                sk: sk-1
                type: openai
                timeout: 30
                stream_timeout: 3
                allow: [gpt-4o-mini, /v1/audio/transcriptions]
                deny: gpt-4
                authorization: [k2]
                noauth: true
                keep_header: yes
                weight: 2.5
                stream_usage: false
            """
        )
        self.assertEqual(config.listen, ("tcp:8080:interface=127.0.0.1", "unix:/run/oaproxy.sock"))
        self.assertEqual(config.hostname, "edge-1")
        self.assertEqual(config.keys, (ClientKey("alice", "k1"),))
        self.assertEqual((config.admin_key, config.metrics_key), ("adm", "met"))
        self.assertEqual(
            (config.timeout, config.stream_timeout, config.stream_idle_timeout),
            (60.0, 5.5, 90.0),
        )
        self.assertIsInstance(config.timeout, float)
        self.assertEqual(config.lb_policy, "random")
        self.assertEqual(config.dbtype, "postgres")
        self.assertEqual(config.dbaddr, "host=127.0.0.1 port=5432 user=postgres dbname=test")
        self.assertEqual(config.redis, "redis://127.0.0.1:6379/2")
        self.assertEqual(config.max_body_bytes, 1048576)
        self.assertEqual(
            config.trusted_proxies,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")),
        )
        self.assertEqual(config.shutdown_timeout, 0.0)
        self.assertEqual(config.log_file, "./log/oaproxy.jsonl")
        self.assertEqual(
            config.records,
            RecordsPolicy(
                body=False,
                response=False,
                headers=True,
                max_field_bytes=1024,
                file="./log/records.jsonl",
                rotate="100MB",
                redis_key="rk",
                redis_maxlen=50,
                spool_dir="/var/spool/oaproxy",
                queue_size=7,
            ),
        )
        self.assertEqual(
            config.notify,
            NotifyConfig(
                feishu=FeishuConfig("https://open.feishu.cn/open-apis/bot/v2/hook/x", "fs"),
                matrix=MatrixConfig("https://matrix.example.org", "tok", "!room:example.org"),
                min_interval=0.0,
                timeout=2.5,
            ),
        )
        self.assertEqual(
            dict(config.prices),
            {"gpt-4o-mini": Price(0.15, 0.6), "gpt-4o": Price(2.5, 10.0)},
        )
        self.assertEqual(
            config.upstreams,
            (
                Upstream(
                    name="main",
                    endpoint="https://api.openai.com/v1",
                    sk="sk-1",
                    type=UpstreamType.OPENAI,
                    timeout=30.0,
                    stream_timeout=3.0,
                    allow=("gpt-4o-mini", "/v1/audio/transcriptions"),
                    deny=("gpt-4",),
                    keys=(ClientKey(key_fingerprint("k2"), "k2"),),
                    noauth=True,
                    keep_header=True,
                    weight=2.5,
                    stream_usage=False,
                ),
            ),
        )

    def test_prices_read_only(self) -> None:
        """The prices mapping cannot be changed once loaded."""
        config = parse("prices: {m: {input: 1, output: 2}}\n" + MINIMAL)
        self.assertRaises(TypeError, operator.setitem, config.prices, "x", Price(0, 0))

    def test_secrets_not_in_repr(self) -> None:
        """No secret of the config (client, admin, database, Feishu, Matrix,
        upstream) is in its repr."""
        config = parse(
            """\
            authorization: {alice: client-secret}
            admin_key: admin-secret
            dbtype: postgres
            dbaddr: "host=h password=db-secret"
            notify:
              feishu: {webhook: "https://f.example/hook", secret: feishu-secret}
              matrix: {homeserver: "https://m.example", access_token: matrix-secret, room_id: "!r:m"}
            upstreams:
              - endpoint: http://a
                sk: upstream-secret
            """
        )
        text = repr(config)
        for secret in (
            "client-secret",
            "admin-secret",
            "db-secret",
            "feishu-secret",
            "matrix-secret",
            "upstream-secret",
        ):
            self.assertNotIn(secret, text)


class OpenAIApiRouteSampleTests(Helpers):
    def test_readme_sample_without_replicate(self) -> None:
        """openai-api-route's README sample loads as it would there: its key,
        deadlines and database, upstreams named by host (numbered when
        repeated), with their lists; only the listen address stays on
        loopback."""
        config = parse(OAR_SAMPLE)
        self.assertEqual(config.keys, (ClientKey(key_fingerprint("woshimima"), "woshimima"),))
        self.assertEqual((config.timeout, config.stream_timeout), (120.0, 10.0))
        self.assertEqual((config.dbtype, config.dbaddr), ("sqlite", "./db.sqlite"))
        first, second, third = config.upstreams
        self.assertEqual(first.name, "localhost:8888")
        self.assertEqual(first.endpoint, "https://localhost:8888/v1")
        self.assertEqual(first.sk, "hahaha")
        self.assertEqual(first.allow, ("/v1/audio/transcriptions",))
        self.assertEqual((first.timeout, first.stream_timeout), (120.0, 10.0))
        self.assertEqual(second.name, "api.openai.com")
        self.assertEqual(second.endpoint, "https://api.openai.com/v2")
        self.assertEqual(second.allow, ("gpt-3.5-trubo", "gpt-3.5-trubo-0613"))
        self.assertEqual(second.deny, ())
        self.assertEqual(third.name, "api.openai.com#2")
        self.assertEqual(third.endpoint, "https://api.openai.com/v1")
        self.assertEqual(third.sk, "secret_key_2")
        self.assertEqual((third.timeout, third.stream_timeout), (30.0, 10.0))
        self.assertEqual(third.deny, ("gpt-4",))
        self.assertEqual(third.allow, ())
        for upstream in config.upstreams:
            self.assertIsNone(upstream.keys)
            self.assertEqual(upstream.type, "openai")
            self.assertFalse(upstream.noauth)
        # openai-api-route's default listen address is ":8888"; ours stays loopback.
        self.assertEqual(config.listen, DEFAULT_LISTEN)

    def test_readme_sample_inherits_changed_timeouts(self) -> None:
        """Upstreams without their own deadlines take the global ones, as openai-api-route does."""
        config = parse(
            OAR_SAMPLE.replace("timeout: 120\nstream_timeout: 10", "timeout: 50\nstream_timeout: 7")
        )
        self.assertEqual(
            [(u.timeout, u.stream_timeout) for u in config.upstreams],
            [(50.0, 7.0), (120.0, 10.0), (30.0, 7.0)],
        )

    def test_readme_sample_with_replicate(self) -> None:
        """openai-api-route's replicate upstream, without an endpoint, goes to
        Replicate's API with its key and allow list."""
        config = parse(OAR_SAMPLE + OAR_REPLICATE)
        replicate = config.upstreams[3]
        self.assertEqual(replicate.type, UpstreamType.REPLICATE)
        self.assertEqual(replicate.endpoint, "https://api.replicate.com/v1")
        self.assertEqual(replicate.name, "api.replicate.com")
        self.assertEqual(replicate.sk, "key_for_replicate")
        self.assertEqual(replicate.allow, ("mistralai/mixtral-8x7b-instruct-v0.1",))
        self.assertFalse(replicate.stream_usage)

    def test_complex_sample(self) -> None:
        """openai-api-route's complex sample: a noauth upstream, and one scoped
        to a guest key named by its fingerprint; all_client_keys has both keys
        once."""
        config = parse(OAR_COMPLEX)
        self.assertEqual(config.keys, (ClientKey(key_fingerprint("woshimima"), "woshimima"),))
        public, guest = config.upstreams
        self.assertTrue(public.noauth)
        self.assertEqual(public.sk, "xxx")
        self.assertIsNone(public.keys)
        self.assertEqual(public.allow, ("/v1/audio/transcriptions",))
        self.assertEqual(public.name, "localhost:5000")
        self.assertIsNone(guest.sk)
        self.assertEqual(guest.keys, (ClientKey("key-84983c60", "guest"),))
        self.assertEqual(key_fingerprint("guest"), "key-84983c60")
        self.assertEqual(guest.allow, ("gpt-3.5-turbo-0125",))
        self.assertFalse(guest.noauth)
        self.assertEqual(guest.endpoint, "https://api.xxx.local/v1")
        self.assertEqual(
            all_client_keys(config),
            (
                ClientKey(key_fingerprint("woshimima"), "woshimima"),
                ClientKey("key-84983c60", "guest"),
            ),
        )

    def test_address_key(self) -> None:
        """openai-api-route's ``address`` is the listen address."""
        config = parse("address: 0.0.0.0:8080\n" + OAR_SAMPLE)
        self.assertEqual(config.listen, ("tcp:8080:interface=0.0.0.0",))

    def test_address_and_listen(self) -> None:
        """Giving both listen and address is refused at address's line."""
        self.fails(
            "listen: tcp:1\naddress: ':2'\n" + MINIMAL,
            2,
            "address",
            "give either 'listen' or 'address'",
        )


class AuthorizationTests(Helpers):
    def test_comma_string(self) -> None:
        """A comma-separated string of keys gives each key trimmed, empty ones
        dropped, each named by its fingerprint."""
        config = parse("authorization: ' k1, k2 ,,k3,'\n" + MINIMAL)
        self.assertEqual([k.secret for k in config.keys], ["k1", "k2", "k3"])
        self.assertEqual(
            [k.name for k in config.keys],
            [key_fingerprint(s) for s in ("k1", "k2", "k3")],
        )

    def test_fingerprint(self) -> None:
        """A key's fingerprint is 'key-' and eight hex digits, stable."""
        self.assertEqual(key_fingerprint("woshimima"), "key-229123a6")

    def test_list(self) -> None:
        """A list of keys gives each key."""
        config = parse("authorization: [k1, k2]\n" + MINIMAL)
        self.assertEqual([k.secret for k in config.keys], ["k1", "k2"])

    def test_numeric_key(self) -> None:
        """Go's YAML decoder reads a number into a string field as its text."""
        config = parse("authorization: 12345678\n" + MINIMAL)
        self.assertEqual([k.secret for k in config.keys], ["12345678"])

    def test_mapping(self) -> None:
        """A mapping names its keys; an upstream's key that is also global keeps its global name."""
        config = parse(
            """\
            authorization:
              alice: k1
              bob: k2
            upstreams:
              - endpoint: http://a
                authorization: k1
              - endpoint: http://b
                authorization: {guest: g}
            """
        )
        self.assertEqual(config.keys, (ClientKey("alice", "k1"), ClientKey("bob", "k2")))
        # The same secret keeps its one name everywhere.
        self.assertEqual(config.upstreams[0].keys, (ClientKey("alice", "k1"),))
        self.assertEqual(config.upstreams[1].keys, (ClientKey("guest", "g"),))

    def test_repeated_key_once(self) -> None:
        """A key given twice is kept once."""
        config = parse("authorization: k1,k1\n" + MINIMAL)
        self.assertEqual(len(config.keys), 1)

    def test_one_key_two_names(self) -> None:
        """One secret under two names is refused at the second, naming the
        first's line and not the secret."""
        error = self.fails(
            "authorization:\n  alice: same-secret\n  bob: same-secret\n" + MINIMAL,
            3,
            "authorization.bob",
            "this key is already named 'alice' on line 2",
        )
        self.assertNotIn("same-secret", str(error))

    def test_one_key_two_names_across_upstreams(self) -> None:
        """One secret named differently globally and on an upstream is refused,
        without the secret in the message."""
        error = self.fails(
            """\
            authorization: {alice: s3cret}
            upstreams:
              - endpoint: http://a
                authorization: {bob: s3cret}
            """,
            4,
            "upstreams[0].authorization.bob",
            "already named 'alice'",
        )
        self.assertNotIn("s3cret", str(error))

    def test_one_name_two_keys(self) -> None:
        """One name for two secrets is refused at the second, naming the first's line."""
        self.fails(
            """\
            authorization: {alice: k1}
            upstreams:
              - endpoint: http://a
                authorization:
                  alice: k2
            """,
            5,
            "upstreams[0].authorization.alice",
            "the name 'alice' is already used for another key on line 1",
        )

    def test_empty_mapping_value(self) -> None:
        """A named key with an empty secret is refused."""
        self.fails(
            "authorization: {alice: ''}\n" + MINIMAL,
            1,
            "authorization.alice",
            "must not be empty",
        )

    def test_wrong_type(self) -> None:
        """A key that is not a string is refused at its place in the list."""
        self.fails(
            "authorization: [[k]]\n" + MINIMAL,
            1,
            "authorization[0]",
            "expected a string, got a list",
        )

    def test_upstream_empty_after_interpolation(self) -> None:
        """An upstream ``authorization`` that interpolates to nothing would
        silently open the upstream to every global key.
        """
        self.fails(
            """\
            authorization: k
            upstreams:
              - endpoint: http://a
                authorization: ${GUEST_KEYS}
            """,
            4,
            "upstreams[0].authorization",
            "no client key left",
            environ={"GUEST_KEYS": ""},
        )

    def test_upstream_empty_string_inherits(self) -> None:
        """As in openai-api-route, an empty upstream authorization means the global keys."""
        config = parse(
            """\
            authorization: k
            upstreams:
              - endpoint: http://a
                authorization: ""
            """
        )
        self.assertIsNone(config.upstreams[0].keys)


class EnvironmentTests(Helpers):
    def test_whole_value(self) -> None:
        """${NAME} as a whole value is replaced by the variable, in any string setting."""
        config = parse(
            """\
            admin_key: ${ADMIN}
            upstreams:
              - endpoint: ${URL}
                sk: ${OPENAI_API_KEY}
            """,
            {"ADMIN": "a", "URL": "https://api.example/v1", "OPENAI_API_KEY": "sk-x"},
        )
        self.assertEqual(config.admin_key, "a")
        self.assertEqual(config.upstreams[0].endpoint, "https://api.example/v1")
        self.assertEqual(config.upstreams[0].sk, "sk-x")

    def test_partial(self) -> None:
        """${NAME} inside a string is replaced in place, several to a value, in lists too."""
        config = parse(
            """\
            hostname: edge-${N}-${REGION}
            upstreams:
              - endpoint: https://${HOST}/v1
                sk: Bearer ${X}
                allow:
                  - ${MODEL}
                  - /v1/${P}
            """,
            {
                "N": "1",
                "REGION": "eu",
                "HOST": "h.example",
                "X": "y",
                "MODEL": "m",
                "P": "audio",
            },
        )
        self.assertEqual(config.hostname, "edge-1-eu")
        self.assertEqual(config.upstreams[0].endpoint, "https://h.example/v1")
        self.assertEqual(config.upstreams[0].sk, "Bearer y")
        self.assertEqual(config.upstreams[0].allow, ("m", "/v1/audio"))

    def test_missing(self) -> None:
        """An unset variable is refused at its line and key, naming the variable."""
        error = self.fails(
            """\
            upstreams:
              - endpoint: http://a
                sk: ${SECRET}
            """,
            3,
            "upstreams[0].sk",
            "environment variable SECRET is not set",
            environ={"OTHER": "x"},
        )
        self.assertEqual(
            str(error),
            f"{PATH}:3: upstreams[0].sk: environment variable SECRET is not set",
        )

    def test_missing_in_list(self) -> None:
        """An unset variable in a list is refused at its item."""
        self.fails(
            """\
            upstreams:
              - endpoint: http://a
                allow:
                  - gpt-4o
                  - ${MODEL}
            """,
            5,
            "upstreams[0].allow[1]",
            "environment variable MODEL is not set",
        )

    def test_escaped(self) -> None:
        """$${ is a literal ${; any other $ stays as it is."""
        config = parse(
            """\
            upstreams:
              - endpoint: http://a
                sk: $${NOT_A_VAR}-$$-$x-${X}
            """,
            {"X": "1"},
        )
        self.assertEqual(config.upstreams[0].sk, "${NOT_A_VAR}-$$-$x-1")

    def test_unterminated(self) -> None:
        """An unterminated ${ is refused as a bad reference."""
        self.fails(
            """\
            upstreams:
              - endpoint: http://a
                sk: abc${X
            """,
            3,
            "upstreams[0].sk",
            "bad '${NAME}' reference",
        )

    def test_bad_name(self) -> None:
        """A variable name that is no name is refused as a bad reference."""
        self.fails("hostname: ${A-B}\n" + MINIMAL, 1, "hostname", "bad '${NAME}' reference")

    def test_content_is_not_yaml(self) -> None:
        """A variable's value is taken as text, never parsed as YAML."""
        value = "[1, 2]\nfoo: bar # ${Y} &a *b"
        config = parse(
            """\
            upstreams:
              - endpoint: http://a
                sk: ${X}
            """,
            {"X": value},
        )
        self.assertEqual(config.upstreams[0].sk, value)

    def test_keys_not_interpolated(self) -> None:
        """Mapping keys are not interpolated."""
        config = parse("authorization:\n  ${NAME}: k\n" + MINIMAL, {"NAME": "n"})
        self.assertEqual(config.keys[0].name, "${NAME}")

    def test_number_from_variable(self) -> None:
        """A whole-value variable may give a number or a boolean, blanks around it allowed."""
        config = parse(
            """\
            timeout: ${T}
            max_body_bytes: "${MAX}"
            upstreams:
              - endpoint: http://a
                noauth: ${PUBLIC}
                keep_header: ${KEEP}
            """,
            {"T": "30.5", "MAX": " 1024 ", "PUBLIC": "true", "KEEP": "no"},
        )
        self.assertEqual(config.timeout, 30.5)
        self.assertEqual(config.max_body_bytes, 1024)
        self.assertTrue(config.upstreams[0].noauth)
        self.assertFalse(config.upstreams[0].keep_header)

    def test_bad_number_from_variable(self) -> None:
        """A variable that gives no number where one is needed is refused
        without showing its value."""
        error = self.fails(
            "timeout: ${T}\n" + MINIMAL,
            1,
            "timeout",
            "expected a number in the environment variable",
            environ={"T": "soon-secret"},
        )
        self.assertNotIn("soon-secret", str(error))

    def test_bad_bool_from_variable(self) -> None:
        """A variable that gives neither true nor false where a boolean is needed is refused."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    noauth: ${P}\n",
            3,
            "upstreams[0].noauth",
            "expected true or false",
            environ={"P": "maybe"},
        )

    def test_partial_variable_in_number(self) -> None:
        """A number with a variable inside it is a string, and refused as one."""
        self.fails(
            "timeout: 1${T}\n" + MINIMAL,
            1,
            "timeout",
            "expected a number, got a string",
            environ={"T": "0"},
        )

    def test_load_config_uses_os_environ(self) -> None:
        """load_config interpolates from os.environ unless given an environment,
        and keeps the path it read."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write("upstreams:\n  - endpoint: http://a\n    sk: ${OAPROXY_TEST_SK}\n")
        self.patch(os, "environ", {"OAPROXY_TEST_SK": "from-env"})
        config = load_config(path)
        self.assertEqual(config.upstreams[0].sk, "from-env")
        self.assertEqual(config.path, path)
        config = load_config(path, {"OAPROXY_TEST_SK": "given"})
        self.assertEqual(config.upstreams[0].sk, "given")


class FileTests(Helpers):
    def test_missing_file(self) -> None:
        """A missing file is refused naming the file, without a line or key."""
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual((error.path, error.line, error.key), (path, None, ""))
        self.assertIn("cannot read the config file", str(error))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused saying so."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"hostname: \xff\n")
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertIn("UTF-8", error.message)

    def test_empty(self) -> None:
        """An empty file is refused as empty, without a line or key."""
        error = self.fails("", None, "", "the config file is empty")
        self.assertEqual(str(error), f"{PATH}: the config file is empty")

    def test_only_comments(self) -> None:
        """A file of comments alone is empty too."""
        self.fails("# nothing\n\n", None, "", "the config file is empty")

    def test_malformed(self) -> None:
        """Broken YAML is refused at the line where the parser gave up."""
        self.fails(
            """\
            timeout: 1
            upstreams:
              - endpoint: http://a
                allow: [a, b
              - endpoint: http://b
            """,
            5,
            "",
            "not valid YAML",
        )

    def test_malformed_indentation(self) -> None:
        """A wrongly indented key is broken YAML, refused at its line."""
        self.fails("timeout: 1\n  stream_timeout: 2\n", 2, "", "not valid YAML")

    def test_tab(self) -> None:
        """A tab in the indentation is refused as broken YAML, the message showing the tab."""
        error = self.fails("upstreams:\n\t- endpoint: http://a\n", 2, "", "not valid YAML")
        self.assertIn("\\t", error.message)

    def test_forbidden_character(self) -> None:
        """A control character is refused as broken YAML, naming it."""
        self.fails(MINIMAL + "hostname: a\x01b\n", 3, "", "#x0001")

    def test_byte_order_mark(self) -> None:
        """A leading byte order mark is ignored."""
        self.assertEqual(parse("\ufeff" + MINIMAL).upstreams[0].name, "api.openai.com")

    def test_recursive_alias(self) -> None:
        """A recursive alias is refused as the wrong type at its place, not looped over."""
        self.fails(
            "upstreams: &a [*a]\n",
            1,
            "upstreams[0]",
            "expected an upstream mapping, got a list",
        )

    def test_two_documents(self) -> None:
        """A second YAML document in the file is refused."""
        self.fails(MINIMAL + "---\n" + MINIMAL, 3, "", "not valid YAML")

    def test_not_a_mapping(self) -> None:
        """A top level that is no mapping is refused saying what it is."""
        self.fails(
            "- a\n- b\n",
            1,
            "",
            "expected a mapping of settings at the top level, got a list",
        )

    def test_duplicate_key(self) -> None:
        """A key given twice is refused at the second, naming the first's line."""
        self.fails(
            "timeout: 1\n" + MINIMAL + "timeout: 2\n",
            4,
            "timeout",
            "duplicate key (first given on line 1)",
        )

    def test_python_tags_refused(self) -> None:
        """Python object tags are not constructed: the value is refused as no string."""
        self.fails(
            "hostname: !!python/object:os.system ls\n" + MINIMAL,
            1,
            "hostname",
            "expected a string",
        )

    def test_merge_keys(self) -> None:
        """YAML merge keys work: an upstream may take another's settings and override some."""
        config = parse(
            """\
            upstreams:
              - &first
                endpoint: http://a
                timeout: 5
              - <<: *first
                endpoint: http://b
            """
        )
        self.assertEqual(
            [(u.endpoint, u.timeout) for u in config.upstreams],
            [("http://a", 5.0), ("http://b", 5.0)],
        )

    def test_anchors(self) -> None:
        """YAML anchors and aliases work."""
        config = parse(
            """\
            upstreams:
              - endpoint: http://a
                allow: &models [m1, m2]
              - endpoint: http://b
                allow: *models
            """
        )
        self.assertEqual(config.upstreams[1].allow, ("m1", "m2"))


class UnknownKeyTests(Helpers):
    def test_top_level(self) -> None:
        """An unknown top-level key is refused at its line, suggesting the likely one."""
        self.fails(
            "timout: 1\n" + MINIMAL,
            1,
            "timout",
            "unknown key 'timout' (did you mean 'timeout'?)",
        )

    def test_upstream(self) -> None:
        """An unknown key in an upstream is refused at its line, naming the
        upstream by its index."""
        self.fails(
            """\
            upstreams:
              - endpoint: http://a
              - endpoint: http://b
                bogus: 1
            """,
            4,
            "upstreams[1].bogus",
            "unknown key 'bogus'",
        )

    def test_records(self) -> None:
        """An unknown key in records is refused at its line."""
        self.fails(
            "records:\n  body: true\n  bodies: false\n" + MINIMAL,
            3,
            "records.bodies",
            "unknown key",
        )

    def test_notify(self) -> None:
        """An unknown channel in notify is refused at its line."""
        self.fails("notify:\n  slack: {}\n" + MINIMAL, 2, "notify.slack", "unknown key")

    def test_feishu(self) -> None:
        """An unknown key in notify.feishu is refused at its line."""
        self.fails(
            "notify:\n  feishu:\n    webhook: https://f\n    token: x\n" + MINIMAL,
            4,
            "notify.feishu.token",
            "unknown key",
        )

    def test_matrix(self) -> None:
        """An unknown key in notify.matrix is refused at its line."""
        self.fails(
            "notify:\n  matrix:\n    homeserver: https://m\n    access_token: t\n    room_id: '!r'\n    room: x\n"
            + MINIMAL,
            6,
            "notify.matrix.room",
            "unknown key",
        )

    def test_prices(self) -> None:
        """An unknown key in a price is refused at its line, suggesting the likely one."""
        self.fails(
            "prices:\n  gpt-4o:\n    input: 1\n    ouput: 2\n" + MINIMAL,
            4,
            "prices.gpt-4o.ouput",
            "unknown key 'ouput' (did you mean 'output'?)",
        )


class TypeTests(Helpers):
    def test_timeout_not_a_number(self) -> None:
        """A timeout that is no number is refused saying what it is."""
        self.fails("timeout: abc\n" + MINIMAL, 1, "timeout", "expected a number, got a string")

    def test_timeout_zero_means_the_default(self) -> None:
        """As in openai-api-route, whose zero value meant "use the default"."""
        config = parse_config(
            "timeout: 0\nstream_timeout: 0\nupstreams:\n  - endpoint: http://a\n    timeout: 0\n",
            "etc/test.yaml",
            {},
        )
        self.assertEqual((config.timeout, config.stream_timeout), (120.0, 10.0))
        self.assertEqual(
            (config.upstreams[0].timeout, config.upstreams[0].stream_timeout), (120.0, 10.0)
        )

    def test_stream_timeout_negative(self) -> None:
        """A negative stream_timeout is refused."""
        self.fails(
            "stream_timeout: -1\n" + MINIMAL,
            1,
            "stream_timeout",
            "must not be negative",
        )

    def test_stream_idle_timeout(self) -> None:
        """A stream_idle_timeout that is no number is refused saying what it is."""
        self.fails(
            "stream_idle_timeout: [1]\n" + MINIMAL,
            1,
            "stream_idle_timeout",
            "expected a number, got a list",
        )

    def test_infinite(self) -> None:
        """An infinite timeout is refused: it must be finite."""
        self.fails("timeout: .inf\n" + MINIMAL, 1, "timeout", "finite")

    def test_bool_is_not_a_number(self) -> None:
        """A boolean is no number, though Python would take it for one."""
        self.fails(
            "timeout: true\n" + MINIMAL,
            1,
            "timeout",
            "expected a number, got a boolean",
        )

    def test_upstream_timeout(self) -> None:
        """An upstream's timeout that is no number is refused at its line and key."""
        self.fails(
            """\
            upstreams:
              - endpoint: http://a
              - endpoint: http://b
                timeout: abc
            """,
            4,
            "upstreams[1].timeout",
            "expected a number",
        )

    def test_upstream_stream_timeout_zero_inherits(self) -> None:
        """An upstream's stream_timeout of 0 takes the global one."""
        config = parse_config(
            "stream_timeout: 7\nupstreams:\n  - endpoint: http://a\n    stream_timeout: 0\n",
            "etc/test.yaml",
            {},
        )
        self.assertEqual(config.upstreams[0].stream_timeout, 7.0)

    def test_upstream_timeout_negative(self) -> None:
        """A negative upstream timeout is refused."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    timeout: -3\n",
            3,
            "upstreams[0].timeout",
            "must not be negative",
        )

    def test_allow_number(self) -> None:
        """An allow list that is a number is refused saying what was expected."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    allow: 3\n",
            3,
            "upstreams[0].allow",
            "expected a string or a list of strings, got an integer",
        )

    def test_allow_single_string(self) -> None:
        """A single string is an allow or deny list of one."""
        config = parse("upstreams:\n  - endpoint: http://a\n    allow: gpt-4o\n    deny: [gpt-4]\n")
        self.assertEqual(config.upstreams[0].allow, ("gpt-4o",))
        self.assertEqual(config.upstreams[0].deny, ("gpt-4",))

    def test_deny_mapping(self) -> None:
        """A deny list that is a mapping is refused saying what was expected."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    deny: {a: b}\n",
            3,
            "upstreams[0].deny",
            "expected a string or a list of strings, got a mapping",
        )

    def test_deny_empty_item(self) -> None:
        """An empty name in a deny list is refused at its item."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    deny:\n      - gpt-4\n      - ''\n",
            5,
            "upstreams[0].deny[1]",
            "must not be empty",
        )

    def test_noauth_string(self) -> None:
        """A quoted 'yes' is a string, not a boolean, and refused for noauth."""
        self.fails(
            'upstreams:\n  - endpoint: http://a\n    noauth: "yes"\n',
            3,
            "upstreams[0].noauth",
            "expected true or false, got a string",
        )

    def test_keep_header_number(self) -> None:
        """A number is not a boolean for keep_header."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    keep_header: 1\n",
            3,
            "upstreams[0].keep_header",
            "expected true or false, got an integer",
        )

    def test_weight(self) -> None:
        """A weight of 0 is refused: it must be greater than 0."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    weight: 0\n",
            3,
            "upstreams[0].weight",
            "must be greater than 0",
        )

    def test_int_for_float(self) -> None:
        """Integers are taken where numbers are expected, as floats."""
        config = parse("timeout: 7\nupstreams:\n  - endpoint: http://a\n    weight: 3\n")
        self.assertEqual(config.timeout, 7.0)
        self.assertEqual(config.upstreams[0].weight, 3.0)

    def test_max_body_bytes(self) -> None:
        """max_body_bytes must be a positive integer."""
        self.fails(
            "max_body_bytes: 1.5\n" + MINIMAL,
            1,
            "max_body_bytes",
            "expected an integer, got a number",
        )
        self.fails(
            "max_body_bytes: 0\n" + MINIMAL,
            1,
            "max_body_bytes",
            "must be greater than 0",
        )

    def test_shutdown_timeout_negative(self) -> None:
        """A negative shutdown_timeout is refused."""
        self.fails(
            "shutdown_timeout: -1\n" + MINIMAL,
            1,
            "shutdown_timeout",
            "must not be negative",
        )

    def test_hostname_mapping(self) -> None:
        """A hostname that is a mapping is refused saying what it is."""
        self.fails(
            "hostname: {a: 1}\n" + MINIMAL,
            1,
            "hostname",
            "expected a string, got a mapping",
        )


class UpstreamTests(Helpers):
    def test_no_endpoint(self) -> None:
        """An upstream without an endpoint is refused at its first line, and the
        message shows none of its settings' values."""
        error = self.fails(
            """\
            authorization: k
            upstreams:
              - endpoint: http://a
              - sk: key
                allow: [m]
            """,
            4,
            "upstreams[1].endpoint",
            "upstream has no endpoint",
        )
        self.assertEqual(str(error), f"{PATH}:4: upstreams[1].endpoint: upstream has no endpoint")
        self.assertNotIn("key", error.message)

    def test_null_endpoint(self) -> None:
        """An endpoint given no value is no endpoint."""
        self.fails(
            "upstreams:\n  - sk: x\n    endpoint:\n",
            3,
            "upstreams[0].endpoint",
            "upstream has no endpoint",
        )

    def test_endpoint_scheme(self) -> None:
        """An endpoint that is no http or https URL is refused without showing its password."""
        error = self.fails(
            "upstreams:\n  - endpoint: ftp://user:pw@host/v1\n",
            2,
            "upstreams[0].endpoint",
            "must be a URL starting with http:// or https://",
        )
        self.assertNotIn("pw", str(error))

    def test_endpoint_not_a_url(self) -> None:
        """An endpoint without a scheme is refused as no URL."""
        self.fails(
            "upstreams:\n  - endpoint: api.openai.com\n",
            2,
            "upstreams[0].endpoint",
            "must be a URL",
        )

    def test_endpoint_bad_port(self) -> None:
        """An endpoint with an impossible port is refused as no valid URL."""
        self.fails(
            "upstreams:\n  - endpoint: http://h:99999/\n",
            2,
            "upstreams[0].endpoint",
            "not a valid URL",
        )

    def test_endpoint_no_host(self) -> None:
        """An endpoint without a host is refused."""
        self.fails(
            "upstreams:\n  - endpoint: 'http:///v1'\n",
            2,
            "upstreams[0].endpoint",
            "no host",
        )

    def test_endpoint_query(self) -> None:
        """An endpoint with a query or fragment is refused."""
        self.fails(
            "upstreams:\n  - endpoint: http://h/v1?x=1\n",
            2,
            "upstreams[0].endpoint",
            "must not have a query or fragment",
        )

    def test_endpoint_trailing_slash(self) -> None:
        """A trailing slash is dropped from an endpoint, so that paths join it cleanly."""
        config = parse(
            "upstreams:\n  - endpoint: https://openrouter.ai/api/v1/\n  - endpoint: http://h/\n"
        )
        self.assertEqual(
            [u.endpoint for u in config.upstreams],
            ["https://openrouter.ai/api/v1", "http://h"],
        )

    def test_sk_forms(self) -> None:
        """sk may be asis, empty or null (none), or a number read as its text."""
        config = parse(
            """\
            upstreams:
              - endpoint: http://a
                sk: asis
              - endpoint: http://a
                sk: ""
              - endpoint: http://a
                sk:
              - endpoint: http://a
                sk: 123456
            """
        )
        self.assertEqual([u.sk for u in config.upstreams], ["asis", None, None, "123456"])

    def test_unknown_type(self) -> None:
        """An unknown upstream type is refused, listing the known ones."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    type: azure\n",
            3,
            "upstreams[0].type",
            "unknown type 'azure'; expected one of: openai, replicate, echo",
        )

    def test_replicate(self) -> None:
        """A replicate upstream's endpoint defaults to Replicate's API, and may be set."""
        config = parse(
            "upstreams:\n  - type: replicate\n  - {type: replicate, endpoint: 'http://r.test/v1'}\n"
        )
        self.assertEqual(
            [u.endpoint for u in config.upstreams],
            ["https://api.replicate.com/v1", "http://r.test/v1"],
        )
        self.assertEqual([u.name for u in config.upstreams], ["api.replicate.com", "r.test"])

    def test_upstreams_missing(self) -> None:
        """A config without upstreams is refused, without a line."""
        error = self.fails("timeout: 1\n", None, "upstreams", "no upstreams are configured")
        self.assertEqual(str(error), f"{PATH}: upstreams: no upstreams are configured")

    def test_upstreams_empty(self) -> None:
        """An empty upstreams list is refused at its line."""
        self.fails("timeout: 1\nupstreams: []\n", 2, "upstreams", "no upstreams are configured")

    def test_upstreams_null(self) -> None:
        """An upstreams key with no value is refused at its line."""
        self.fails("timeout: 1\nupstreams:\n", 2, "upstreams", "no upstreams are configured")

    def test_upstreams_mapping(self) -> None:
        """upstreams as a mapping instead of a list is refused saying so."""
        self.fails(
            "upstreams:\n  endpoint: http://a\n",
            1,
            "upstreams",
            "expected a list of upstreams, got a mapping",
        )

    def test_upstream_not_a_mapping(self) -> None:
        """An upstream that is a bare string is refused saying what was expected."""
        self.fails(
            "upstreams:\n  - http://a\n",
            2,
            "upstreams[0]",
            "expected an upstream mapping, got a string",
        )


class UpstreamNameTests(Helpers):
    def test_defaults(self) -> None:
        """Unnamed upstreams are named by host (and port when given),
        lower-cased, without credentials, numbered from #2 when a name
        repeats."""
        config = parse(
            """\
            upstreams:
              - endpoint: https://api.openai.com/v1
              - endpoint: https://API.openai.com/v2
              - endpoint: http://localhost:5000/v1
              - endpoint: https://api.openai.com/v3
              - endpoint: http://[::1]:8080/v1
            """
        )
        self.assertEqual(
            [u.name for u in config.upstreams],
            [
                "api.openai.com",
                "api.openai.com#2",
                "localhost:5000",
                "api.openai.com#3",
                "[::1]:8080",
            ],
        )

    def test_explicit_wins(self) -> None:
        """A name given explicitly keeps it; the unnamed upstream it collides
        with is numbered instead."""
        config = parse(
            """\
            upstreams:
              - endpoint: https://api.openai.com/v1
              - name: api.openai.com
                endpoint: http://other/v1
            """
        )
        self.assertEqual([u.name for u in config.upstreams], ["api.openai.com#2", "api.openai.com"])

    def test_explicit_duplicate(self) -> None:
        """Two upstreams explicitly given one name are refused at the second,
        naming the first's line."""
        self.fails(
            """\
            upstreams:
              - name: main
                endpoint: http://a
              - endpoint: http://b
                name: main
            """,
            5,
            "upstreams[1].name",
            "upstream name 'main' is already used on line 2",
        )

    def test_empty_name(self) -> None:
        """An empty upstream name is refused."""
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    name: ''\n",
            3,
            "upstreams[0].name",
            "must not be empty",
        )


class PolicyTests(Helpers):
    def test_lb_policies(self) -> None:
        """Every balancing policy of the issue loads, as its enum member."""
        for policy in LbPolicy:
            config = parse(f"lb_policy: {policy.value}\n" + MINIMAL)
            self.assertIs(config.lb_policy, policy)
            self.assertEqual(config.lb_policy, policy.value)

    def test_lb_policy_unknown(self) -> None:
        """An unknown lb_policy is refused, listing the known ones."""
        self.fails(
            "lb_policy: fastest\n" + MINIMAL,
            1,
            "lb_policy",
            "unknown value 'fastest'; expected one of: order, random, round_robin, weighted,"
            " least_latency, least_busy",
        )

    def test_dbtype(self) -> None:
        """dbtype is one of sqlite, postgres and none; dbaddr is kept as given."""
        self.fails(
            "dbtype: mysql\n" + MINIMAL,
            1,
            "dbtype",
            "expected one of: sqlite, postgres, none",
        )
        self.assertEqual(parse("dbtype: none\n" + MINIMAL).dbtype, "none")
        self.assertEqual(parse("dbaddr: /var/lib/x.sqlite\n" + MINIMAL).dbaddr, "/var/lib/x.sqlite")

    def test_postgres_needs_dbaddr(self) -> None:
        """dbtype postgres without a dbaddr, or with an empty one, is refused."""
        self.fails(
            "dbtype: postgres\n" + MINIMAL,
            1,
            "dbaddr",
            "dbtype postgres needs a dbaddr",
        )
        self.fails(
            "dbtype: postgres\ndbaddr: ''\n" + MINIMAL,
            2,
            "dbaddr",
            "dbtype postgres needs a dbaddr",
        )

    def test_postgres_dsn(self) -> None:
        """A PostgreSQL URL is a valid dbaddr; text that is no libpq DSN is
        refused without being shown."""
        config = parse("dbtype: postgres\ndbaddr: postgresql://postgres@127.0.0.1/test\n" + MINIMAL)
        self.assertEqual(config.dbaddr, "postgresql://postgres@127.0.0.1/test")
        error = self.fails(
            "dbtype: postgres\ndbaddr: not-a-dsn-secret\n" + MINIMAL,
            2,
            "dbaddr",
            "expected a libpq DSN",
        )
        self.assertNotIn("secret", str(error))

    def test_redis(self) -> None:
        """redis must be a redis:// URL with a numeric database; a wrong one is
        refused without its password."""
        self.assertEqual(parse("redis: redis://h:6380\n" + MINIMAL).redis, "redis://h:6380")
        error = self.fails(
            "redis: http://:pw@h/0\n" + MINIMAL,
            1,
            "redis",
            "must be a URL starting with redis://",
        )
        self.assertNotIn("pw", str(error))
        self.fails("redis: redis://h/abc\n" + MINIMAL, 1, "redis", "must be a number")

    def test_trusted_proxies(self) -> None:
        """trusted_proxies takes an address or a list of addresses and networks,
        host bits dropped; anything else is refused at its item."""
        config = parse("trusted_proxies: 10.1.2.3\n" + MINIMAL)
        self.assertEqual(config.trusted_proxies, (ipaddress.ip_network("10.1.2.3/32"),))
        self.assertEqual(parse("trusted_proxies: []\n" + MINIMAL).trusted_proxies, ())
        self.assertEqual(
            parse("trusted_proxies: [10.0.0.1/8]\n" + MINIMAL).trusted_proxies,
            (ipaddress.ip_network("10.0.0.0/8"),),
        )
        self.fails(
            "trusted_proxies:\n  - 10.0.0.0/8\n  - 300.1.1.1\n" + MINIMAL,
            3,
            "trusted_proxies[1]",
            "'300.1.1.1' is not an IP address or CIDR network",
        )

    def test_cors_origins(self) -> None:
        """Origins as browsers send them, '*' alone, or none; never a path."""
        self.assertIsNone(parse(MINIMAL).cors_origins)
        self.assertEqual(parse("cors_origins: '*'\n" + MINIMAL).cors_origins, ("*",))
        self.assertEqual(parse("cors_origins: []\n" + MINIMAL).cors_origins, ())
        self.assertEqual(
            parse(
                "cors_origins: [https://app.example, 'http://localhost:3000']\n" + MINIMAL
            ).cors_origins,
            ("https://app.example", "http://localhost:3000"),
        )
        for bad in ("https://app.example/", "https://app.example/x", "app.example", "HTTPS://A.B"):
            self.fails(f"cors_origins: ['{bad}']\n" + MINIMAL, 1, "cors_origins", "not an origin")
        self.fails("cors_origins: ['*', https://a.b]\n" + MINIMAL, 1, "cors_origins", "alone")
        self.fails("cors_origins: ['https://a.b:x']\n" + MINIMAL, 1, "cors_origins", "bad port")

    def test_rotate(self) -> None:
        """records.rotate is daily or a size; another word or a zero size is refused."""
        for rotate in ("daily", "100MB", "10KB", "1048576", "1G"):
            config = parse(f"records: {{rotate: {rotate}}}\n" + MINIMAL)
            self.assertEqual(config.records.rotate, rotate)
        self.fails(
            "records:\n  rotate: weekly\n" + MINIMAL,
            2,
            "records.rotate",
            "expected 'daily' or a size",
        )
        self.fails("records:\n  rotate: 0MB\n" + MINIMAL, 2, "records.rotate", "greater than 0")

    def test_parse_size(self) -> None:
        """Sizes are a positive whole number with an optional binary unit (K,
        KB, KiB, M, G...); anything else is refused."""
        self.assertEqual(parse_size("100MB"), 100 * 1024 * 1024)
        self.assertEqual(parse_size("10KB"), 10 * 1024)
        self.assertEqual(parse_size("10k"), 10 * 1024)
        self.assertEqual(parse_size("2 GiB"), 2 * 1024**3)
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("512B"), 512)
        for bad in ("", "MB", "1.5MB", "10 XB", "-1", "0", "10iB"):
            self.assertRaises(ValueError, parse_size, bad)

    def test_records_types(self) -> None:
        """records' settings are typed: booleans, a positive queue size, and
        records itself a mapping."""
        self.fails(
            "records:\n  body: 'no'\n" + MINIMAL,
            2,
            "records.body",
            "expected true or false",
        )
        self.fails(
            "records:\n  queue_size: 0\n" + MINIMAL,
            2,
            "records.queue_size",
            "greater than 0",
        )
        self.fails(
            "records: true\n" + MINIMAL,
            1,
            "records",
            "expected a mapping of record settings, got a boolean",
        )

    def test_notify_missing(self) -> None:
        """A channel lacking what it needs (Feishu's webhook, Matrix's room) or
        with a bad URL is refused, and notify.timeout must be positive."""
        self.fails(
            "notify:\n  feishu: {secret: s}\n" + MINIMAL,
            2,
            "notify.feishu.webhook",
            "feishu needs a webhook",
        )
        self.fails(
            "notify:\n  matrix:\n    homeserver: https://m\n    access_token: t\n" + MINIMAL,
            2,
            "notify.matrix.room_id",
            "matrix needs room_id",
        )
        self.fails(
            "notify:\n  feishu: {webhook: ftp://x}\n" + MINIMAL,
            2,
            "notify.feishu.webhook",
            "must be a URL",
        )
        self.fails("notify:\n  timeout: 0\n" + MINIMAL, 2, "notify.timeout", "greater than 0")

    def test_prices(self) -> None:
        """A price needs both input and output, neither negative, in a mapping;
        zero prices are allowed."""
        self.fails(
            "prices:\n  m: {input: 1}\n" + MINIMAL,
            2,
            "prices.m.output",
            "the price needs output",
        )
        self.fails(
            "prices:\n  m: {input: -1, output: 1}\n" + MINIMAL,
            2,
            "prices.m.input",
            "must not be negative",
        )
        self.fails(
            "prices:\n  m: 3\n" + MINIMAL,
            2,
            "prices.m",
            "expected a mapping with input and output",
        )
        self.assertEqual(
            parse("prices: {m: {input: 0, output: 0}}\n" + MINIMAL).prices["m"],
            Price(0.0, 0.0),
        )

    def test_empty_admin_key_is_off(self) -> None:
        """An admin_key that interpolates to nothing means no admin key."""
        config = parse("admin_key: ${ADMIN}\n" + MINIMAL, {"ADMIN": ""})
        self.assertIsNone(config.admin_key)


class ListenTests(Helpers):
    def test_forms(self) -> None:
        """Listen addresses may be endpoint strings, kept as they are, or
        openai-api-route's host:port forms, turned into endpoints (localhost
        meaning 127.0.0.1)."""
        cases = {
            "tcp:8888:interface=127.0.0.1": "tcp:8888:interface=127.0.0.1",
            ":8888": "tcp:8888",
            "0.0.0.0:8080": "tcp:8080:interface=0.0.0.0",
            "127.0.0.1:8080": "tcp:8080:interface=127.0.0.1",
            "localhost:9000": "tcp:9000:interface=127.0.0.1",
            "myhost.example:80": "tcp:80:interface=myhost.example",
            "[::1]:8080": "tcp6:8080:interface=\\:\\:1",
            "tcp6:8080:interface=\\:\\:1": "tcp6:8080:interface=\\:\\:1",
            "unix:/run/oaproxy.sock": "unix:/run/oaproxy.sock",
            "systemd:domain=INET:index=0": "systemd:domain=INET:index=0",
            "ssl:8443:privateKey=key.pem:certKey=cert.pem": "ssl:8443:privateKey=key.pem:certKey=cert.pem",
            "tcp:port=8080": "tcp:port=8080",
        }
        for given, expected in cases.items():
            self.assertEqual(parse_listen(given), expected, given)

    def test_bad_forms(self) -> None:
        """An empty address, a missing or bad port, an unknown endpoint type (as
        a dotless name before the colon reads), a bad address in brackets or a
        trailing escape is refused."""
        for bad in (
            "",
            "tcp",
            "tcp:abc",
            "tcp:99999",
            "foo:bar:baz",
            "unix:",
            "systemd:index=0",
            "[zz]:80",
            "tcp:1\\",
            "myhost:80",
        ):
            self.assertRaises(ValueError, parse_listen, bad)

    def test_listen_string(self) -> None:
        """One listen address may be given as a string."""
        config = parse("authorization: k\nlisten: ':8888'\n" + MINIMAL)
        self.assertEqual(config.listen, ("tcp:8888",))

    def test_listen_list(self) -> None:
        """Several listen addresses may be given as a list, each in either form."""
        config = parse("listen:\n  - 127.0.0.1:8080\n  - unix:/tmp/s\n" + MINIMAL)
        self.assertEqual(config.listen, ("tcp:8080:interface=127.0.0.1", "unix:/tmp/s"))

    def test_bad_listen_item(self) -> None:
        """A bad item in the listen list is refused at its line."""
        self.fails(
            "listen:\n  - tcp:8080:interface=127.0.0.1\n  - tpc:8081\n" + MINIMAL,
            3,
            "listen[1]",
            "unknown endpoint type 'tpc'",
        )

    def test_bad_listen(self) -> None:
        """A bad port, an empty list and a bare number are refused for listen."""
        self.fails("listen: tcp:http\n" + MINIMAL, 1, "listen", "the port must be a number")
        self.fails("listen: []\n" + MINIMAL, 1, "listen", "no listen address")
        self.fails(
            "listen: 8888\n" + MINIMAL,
            1,
            "listen",
            "expected a string or a list of strings, got an integer",
        )

    def test_is_loopback(self) -> None:
        """Loopback interfaces, localhost and unix sockets are loopback
        listeners; any other interface, none, an inherited socket or garbage is
        not."""
        loopback = (
            "tcp:8888:interface=127.0.0.1",
            "tcp:8888:interface=127.3.2.1",
            "tcp:8888:interface=localhost",
            "tcp6:8888:interface=\\:\\:1",
            "ssl:8443:interface=127.0.0.1",
            "unix:/run/oaproxy.sock",
            "127.0.0.1:8888",
            "localhost:8888",
            "[::1]:8888",
        )
        public = (
            "tcp:8888",
            "tcp:8888:interface=0.0.0.0",
            "tcp:8888:interface=192.168.1.2",
            "tcp6:8888",
            "tcp6:8888:interface=\\:\\:",
            "ssl:8443",
            "systemd:domain=INET:index=0",
            ":8888",
            "0.0.0.0:8888",
            "myhost.example:8888",
            "garbage",
        )
        for desc in loopback:
            self.assertTrue(is_loopback_endpoint(desc), desc)
        for desc in public:
            self.assertFalse(is_loopback_endpoint(desc), desc)


class OpenRelayTests(Helpers):
    def test_refused(self) -> None:
        """A public listener without any client key is refused as an open relay,
        naming the listener."""
        error = self.fails(
            "timeout: 5\nlisten: tcp:8888\n" + MINIMAL,
            2,
            "listen",
            "refusing to start an open relay",
        )
        self.assertIn("'tcp:8888'", error.message)

    def test_refused_in_list(self) -> None:
        """One public listener among loopback ones is enough to be refused."""
        self.fails(
            "listen: [unix:/tmp/s, '0.0.0.0:80']\n" + MINIMAL,
            1,
            "listen",
            "'tcp:80:interface=0.0.0.0' is not a loopback listener",
        )

    def test_openai_api_route_address_without_keys(self) -> None:
        """openai-api-route's public ':8888' address without keys is refused as
        an open relay at address's line."""
        self.fails(
            "address: ':8888'\n" + MINIMAL,
            1,
            "address",
            "refusing to start an open relay",
        )

    def test_systemd_refused(self) -> None:
        """An inherited socket may be public: without keys it is refused too."""
        self.fails("listen: systemd:domain=INET:index=0\n" + MINIMAL, 1, "listen", "open relay")

    def test_loopback_allowed(self) -> None:
        """Loopback listeners need no keys, the default one included."""
        for listen in (
            "tcp:8888:interface=127.0.0.1",
            "unix:/tmp/s",
            "'[::1]:80'",
            "localhost:8080",
        ):
            parse(f"listen: {listen}\n" + MINIMAL)
        parse(MINIMAL)

    def test_global_keys_allowed(self) -> None:
        """A public listener is allowed when there are global keys."""
        parse("authorization: k\nlisten: tcp:8888\n" + MINIMAL)

    def test_upstream_keys_allowed(self) -> None:
        """Keys on an upstream alone are keys enough for a public listener."""
        parse("listen: tcp:8888\nupstreams:\n  - endpoint: http://a\n    authorization: guest\n")

    def test_noauth_upstream_allowed(self) -> None:
        """A noauth upstream says the openness is meant: a public listener is
        allowed without keys."""
        config = parse(
            "listen: tcp:8888\nupstreams:\n  - endpoint: http://a\n    noauth: true\n  - endpoint: http://b\n"
        )
        self.assertEqual(config.keys, ())

    def test_check_listeners_override(self) -> None:
        """``--listen`` replaces ``listen:``: the caller checks it again."""
        config = parse(MINIMAL)
        check_listeners(config, ["tcp:8080:interface=127.0.0.1"])
        error = self.assertRaises(ConfigError, check_listeners, config, ["unix:/s", "tcp:8080"])
        self.assertEqual((error.path, error.line, error.key), (PATH, None, "listen"))
        self.assertIn("open relay", error.message)
        error = self.assertRaises(ConfigError, check_listeners, config, [":8080"], key="--listen")
        self.assertEqual(str(error).split(": ")[:2], [PATH, "--listen"])

    def test_check_listeners_with_keys(self) -> None:
        """With keys, check_listeners lets public and inherited listeners through."""
        config = parse("authorization: k\n" + MINIMAL)
        check_listeners(config, ["tcp:80", "systemd:domain=INET:index=0"])


class RequiredKeyTests(Helpers):
    """A required key given as null is as missing as one left out; the
    message names the key's own line."""

    def test_null_webhook(self) -> None:
        """``webhook:`` with nothing after it: feishu still needs one."""
        self.fails(
            "notify:\n  feishu:\n    webhook:\n" + MINIMAL,
            3,
            "notify.feishu.webhook",
            "feishu needs a webhook",
        )

    def test_null_price(self) -> None:
        """A null price is reported on its own line, not on its model's."""
        self.fails(
            "prices:\n  m:\n    input:\n    output: 1\n" + MINIMAL,
            3,
            "prices.m.input",
            "the price needs input",
        )


@frozen
class _Level:
    level: int = field(default=3, metadata=read(integer))


@frozen
class _Section:
    """A section as the model writes one, to show what the schema derives."""

    name: str = field(metadata=read(text, missing="the section needs a name"))
    size: float = field(default=1.0, metadata=read(number))
    colour: str = field(
        default="red", metadata=read(one_of(("red", "blue")), key="color", alias="colour")
    )
    nested: _Level = field(factory=_Level, metadata=section(_Level, "a mapping of levels"))
    named: Mapping[str, _Level] = field(
        default=MappingProxyType({}),
        metadata=named_sections(_Level, "a mapping of names to levels", "a level mapping"),
    )
    not_a_key: int = 0


def read_toy(text: str) -> _Section:
    return read_document(
        dedent(text), PATH, {}, lambda nodes, root: read_section(nodes, root, _Section, "a toy")
    )


class SchemaTests(Helpers):
    """A section is its attrs class: keys, defaults and messages follow from
    the fields."""

    def test_defaults_are_the_attrs_defaults(self) -> None:
        """Keys left out or null take the attrs defaults; nothing else states them."""
        self.assertEqual(read_toy("name: a\nsize:\n"), _Section(name="a"))

    def test_every_key(self) -> None:
        """Each field is read by its reader, under its file name or its alias,
        nested and named sections included."""
        toy = read_toy(
            """\
            name: a
            size: 2
            color: blue
            nested: {level: 4}
            named: {x: {level: 5}, y: {}}
            """
        )
        self.assertEqual(
            toy,
            _Section(
                name="a",
                size=2.0,
                colour="blue",
                nested=_Level(4),
                named={"x": _Level(5), "y": _Level()},
            ),
        )
        self.assertEqual(read_toy("name: a\ncolour: blue\n").colour, "blue")

    def test_allowed_keys(self) -> None:
        """The allowed keys are the fields with metadata, aliases and nested
        sections included; any other key is refused where it is written."""
        self.assertEqual(
            every_key(_Section), {"name", "size", "color", "colour", "nested", "named", "level"}
        )
        error = self.assertRaises(ConfigError, read_toy, "name: a\nnot_a_key: 1\n")
        self.assertEqual((error.line, error.key), (2, "not_a_key"))
        self.assertEqual(error.message, "unknown key 'not_a_key'")
        error = self.assertRaises(ConfigError, read_toy, "name: a\nnested: {levels: 1}\n")
        self.assertEqual(error.key, "nested.levels")
        self.assertIn("(did you mean 'level'?)", error.message)

    def test_key_and_alias(self) -> None:
        """One setting under both its names is refused at the later one."""
        error = self.assertRaises(ConfigError, read_toy, "colour: red\nname: a\ncolor: red\n")
        self.assertEqual((error.line, error.key), (3, "color"))
        self.assertEqual(
            error.message,
            "give either 'color' or 'colour' (openai-api-route's name for it), not both",
        )

    def test_required(self) -> None:
        """A field without a default, absent: the section's line; null: its own."""
        error = self.assertRaises(ConfigError, read_toy, "size: 1\n")
        self.assertEqual(
            (error.line, error.key, error.message), (1, "name", "the section needs a name")
        )
        error = self.assertRaises(ConfigError, read_toy, "size: 1\nname:\n")
        self.assertEqual(
            (error.line, error.key, error.message), (2, "name", "the section needs a name")
        )

    def test_messages_name_the_section(self) -> None:
        """A named section's entry is described by the words the field gives."""
        error = self.assertRaises(ConfigError, read_toy, "name: a\nnamed: {x: 1}\n")
        self.assertEqual(error.key, "named.x")
        self.assertEqual(error.message, "expected a level mapping, got an integer")


class TrafficControlConfigTests(Helpers):
    """cache:, ip_allow, ip_deny, content_filter: (and per upstream)."""

    def test_defaults(self) -> None:
        """All off by default; cache: {} is the cache with its defaults."""
        config = parse(MINIMAL)
        self.assertEqual(
            (config.cache, config.ip_allow, config.ip_deny, config.content_filter),
            (None, (), (), None),
        )
        self.assertTrue(config.upstreams[0].content_filter)
        cache = parse("cache: {}\n" + MINIMAL).cache
        assert cache is not None
        self.assertEqual(
            (cache.backend, cache.ttl, cache.max_entries, cache.max_entry_bytes, cache.default),
            (CacheBackend.MEMORY, 3600, 10000, 1048576, False),
        )
        self.assertEqual(
            cache.routes, ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
        )

    def test_values(self) -> None:
        """Routes lose a trailing /; networks are read as CIDRs; patterns stay as written."""
        config = parse(
            """\
            redis: redis://127.0.0.1:6379/0
            cache: {backend: redis, routes: [/v1/embeddings/], shared: true}
            ip_allow: [10.0.0.0/8, 192.0.2.1]
            ip_deny: ["2001:db8::/32"]
            content_filter: {patterns: [' secret '], words: [project-x]}
            upstreams:
              - {endpoint: "https://a/v1", content_filter: false}
            """
        )
        assert config.cache is not None and config.content_filter is not None
        self.assertEqual((config.cache.routes, config.cache.shared), (("/v1/embeddings",), True))
        self.assertEqual(
            config.ip_allow,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32")),
        )
        self.assertEqual(config.content_filter.patterns, (" secret ",))
        self.assertFalse(config.upstreams[0].content_filter)

    def test_errors(self) -> None:
        """Each mistake is refused at its line, naming the key."""
        self.fails(
            "cache: {backend: redis}\n" + MINIMAL, 1, "cache.backend", "needs the top-level redis"
        )
        self.fails("cache: {backend: disk}\n" + MINIMAL, 1, "cache.backend", "unknown value 'disk'")
        self.fails(
            "cache: {routes: [chat]}\n" + MINIMAL, 1, "cache.routes[0]", "is not an API path"
        )
        self.fails("cache: {ttl: 0}\n" + MINIMAL, 1, "cache.ttl", "must be greater than 0")
        self.fails("ip_deny: [10.0.0.300/8]\n" + MINIMAL, 1, "ip_deny[0]", "is not an IP address")
        self.fails(
            "content_filter:\n  patterns: ['(a)\\1']\n" + MINIMAL,
            2,
            "content_filter.patterns[0]",
            "not an RE2 pattern: invalid escape sequence",
        )
        self.fails(
            "content_filter: {patterns: ['(?<=a)b']}\n" + MINIMAL,
            1,
            "content_filter.patterns[0]",
            "not an RE2 pattern",
        )
        self.fails(
            "content_filter: {wrods: [x]}\n" + MINIMAL, 1, "content_filter.wrods", "unknown key"
        )
