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
    ClientKey,
    Config,
    ConfigError,
    FeishuConfig,
    MatrixConfig,
    NotifyConfig,
    Price,
    RecordsPolicy,
    Upstream,
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
        error = ConfigError("c.yaml", 7, "upstreams[1].timeout", "must be greater than 0")
        self.assertEqual(str(error), "c.yaml:7: upstreams[1].timeout: must be greater than 0")
        self.assertEqual(
            (error.path, error.line, error.key, error.message),
            ("c.yaml", 7, "upstreams[1].timeout", "must be greater than 0"),
        )

    def test_str_without_line(self) -> None:
        error = ConfigError("c.yaml", None, "upstreams", "no upstreams are configured")
        self.assertEqual(str(error), "c.yaml: upstreams: no upstreams are configured")

    def test_str_without_key(self) -> None:
        self.assertEqual(str(ConfigError("c.yaml", 3, "", "bad")), "c.yaml:3: bad")

    def test_one_line(self) -> None:
        error = ConfigError("c.yaml", 1, "k", "two\nlines")
        self.assertEqual(error.message, "two lines")


class DefaultsTests(SynchronousTestCase):
    def test_top_level_defaults(self) -> None:
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
        self.assertEqual(config.stream_idle_timeout, 120.0)
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

    def test_records_defaults(self) -> None:
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
        [upstream] = parse(MINIMAL).upstreams
        self.assertEqual(
            upstream,
            Upstream(
                name="api.openai.com",
                endpoint="https://api.openai.com/v1",
                sk=None,
                type="openai",
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
                    type="openai",
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
        config = parse("prices: {m: {input: 1, output: 2}}\n" + MINIMAL)
        self.assertRaises(TypeError, operator.setitem, config.prices, "x", Price(0, 0))

    def test_secrets_not_in_repr(self) -> None:
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
        config = parse(
            OAR_SAMPLE.replace("timeout: 120\nstream_timeout: 10", "timeout: 50\nstream_timeout: 7")
        )
        self.assertEqual(
            [(u.timeout, u.stream_timeout) for u in config.upstreams],
            [(50.0, 7.0), (120.0, 10.0), (30.0, 7.0)],
        )

    def test_readme_sample_with_replicate(self) -> None:
        text = OAR_SAMPLE + OAR_REPLICATE
        line = text.splitlines().index("    type: replicate") + 1
        self.assertEqual(line, 38)
        error = self.fails(text, 38, "upstreams[3].type", "type 'replicate' is not supported yet")
        self.assertEqual(
            str(error),
            f"{PATH}:38: upstreams[3].type: type 'replicate' is not supported yet",
        )

    def test_complex_sample(self) -> None:
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
        self.fails(
            "listen: tcp:1\naddress: ':2'\n" + MINIMAL,
            2,
            "address",
            "give either 'listen' or 'address'",
        )


class AuthorizationTests(Helpers):
    def test_comma_string(self) -> None:
        config = parse("authorization: ' k1, k2 ,,k3,'\n" + MINIMAL)
        self.assertEqual([k.secret for k in config.keys], ["k1", "k2", "k3"])
        self.assertEqual(
            [k.name for k in config.keys],
            [key_fingerprint(s) for s in ("k1", "k2", "k3")],
        )

    def test_fingerprint(self) -> None:
        self.assertEqual(key_fingerprint("woshimima"), "key-229123a6")

    def test_list(self) -> None:
        config = parse("authorization: [k1, k2]\n" + MINIMAL)
        self.assertEqual([k.secret for k in config.keys], ["k1", "k2"])

    def test_numeric_key(self) -> None:
        """Go's YAML decoder reads a number into a string field as its text."""
        config = parse("authorization: 12345678\n" + MINIMAL)
        self.assertEqual([k.secret for k in config.keys], ["12345678"])

    def test_mapping(self) -> None:
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
        config = parse("authorization: k1,k1\n" + MINIMAL)
        self.assertEqual(len(config.keys), 1)

    def test_one_key_two_names(self) -> None:
        error = self.fails(
            "authorization:\n  alice: same-secret\n  bob: same-secret\n" + MINIMAL,
            3,
            "authorization.bob",
            "this key is already named 'alice' on line 2",
        )
        self.assertNotIn("same-secret", str(error))

    def test_one_key_two_names_across_upstreams(self) -> None:
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
        self.fails(
            "authorization: {alice: ''}\n" + MINIMAL,
            1,
            "authorization.alice",
            "must not be empty",
        )

    def test_wrong_type(self) -> None:
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
        self.fails("hostname: ${A-B}\n" + MINIMAL, 1, "hostname", "bad '${NAME}' reference")

    def test_content_is_not_yaml(self) -> None:
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
        config = parse("authorization:\n  ${NAME}: k\n" + MINIMAL, {"NAME": "n"})
        self.assertEqual(config.keys[0].name, "${NAME}")

    def test_number_from_variable(self) -> None:
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
        error = self.fails(
            "timeout: ${T}\n" + MINIMAL,
            1,
            "timeout",
            "expected a number in the environment variable",
            environ={"T": "soon-secret"},
        )
        self.assertNotIn("soon-secret", str(error))

    def test_bad_bool_from_variable(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    noauth: ${P}\n",
            3,
            "upstreams[0].noauth",
            "expected true or false",
            environ={"P": "maybe"},
        )

    def test_partial_variable_in_number(self) -> None:
        self.fails(
            "timeout: 1${T}\n" + MINIMAL,
            1,
            "timeout",
            "expected a number, got a string",
            environ={"T": "0"},
        )

    def test_load_config_uses_os_environ(self) -> None:
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
        path = self.mktemp()
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertEqual((error.path, error.line, error.key), (path, None, ""))
        self.assertIn("cannot read the config file", str(error))

    def test_not_utf8(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"hostname: \xff\n")
        error = self.assertRaises(ConfigError, load_config, path, {})
        self.assertIn("UTF-8", error.message)

    def test_empty(self) -> None:
        error = self.fails("", None, "", "the config file is empty")
        self.assertEqual(str(error), f"{PATH}: the config file is empty")

    def test_only_comments(self) -> None:
        self.fails("# nothing\n\n", None, "", "the config file is empty")

    def test_malformed(self) -> None:
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
        self.fails("timeout: 1\n  stream_timeout: 2\n", 2, "", "not valid YAML")

    def test_tab(self) -> None:
        error = self.fails("upstreams:\n\t- endpoint: http://a\n", 2, "", "not valid YAML")
        self.assertIn("\\t", error.message)

    def test_forbidden_character(self) -> None:
        self.fails(MINIMAL + "hostname: a\x01b\n", 3, "", "#x0001")

    def test_byte_order_mark(self) -> None:
        self.assertEqual(parse("\ufeff" + MINIMAL).upstreams[0].name, "api.openai.com")

    def test_recursive_alias(self) -> None:
        self.fails(
            "upstreams: &a [*a]\n",
            1,
            "upstreams[0]",
            "expected an upstream mapping, got a list",
        )

    def test_two_documents(self) -> None:
        self.fails(MINIMAL + "---\n" + MINIMAL, 3, "", "not valid YAML")

    def test_not_a_mapping(self) -> None:
        self.fails(
            "- a\n- b\n",
            1,
            "",
            "expected a mapping of settings at the top level, got a list",
        )

    def test_duplicate_key(self) -> None:
        self.fails(
            "timeout: 1\n" + MINIMAL + "timeout: 2\n",
            4,
            "timeout",
            "duplicate key (first given on line 1)",
        )

    def test_python_tags_refused(self) -> None:
        self.fails(
            "hostname: !!python/object:os.system ls\n" + MINIMAL,
            1,
            "hostname",
            "expected a string",
        )

    def test_merge_keys(self) -> None:
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
        self.fails(
            "timout: 1\n" + MINIMAL,
            1,
            "timout",
            "unknown key 'timout' (did you mean 'timeout'?)",
        )

    def test_upstream(self) -> None:
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
        self.fails(
            "records:\n  body: true\n  bodies: false\n" + MINIMAL,
            3,
            "records.bodies",
            "unknown key",
        )

    def test_notify(self) -> None:
        self.fails("notify:\n  slack: {}\n" + MINIMAL, 2, "notify.slack", "unknown key")

    def test_feishu(self) -> None:
        self.fails(
            "notify:\n  feishu:\n    webhook: https://f\n    token: x\n" + MINIMAL,
            4,
            "notify.feishu.token",
            "unknown key",
        )

    def test_matrix(self) -> None:
        self.fails(
            "notify:\n  matrix:\n    homeserver: https://m\n    access_token: t\n    room_id: '!r'\n    room: x\n"
            + MINIMAL,
            6,
            "notify.matrix.room",
            "unknown key",
        )

    def test_prices(self) -> None:
        self.fails(
            "prices:\n  gpt-4o:\n    input: 1\n    ouput: 2\n" + MINIMAL,
            4,
            "prices.gpt-4o.ouput",
            "unknown key 'ouput' (did you mean 'output'?)",
        )


class TypeTests(Helpers):
    def test_timeout_not_a_number(self) -> None:
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
        self.fails(
            "stream_timeout: -1\n" + MINIMAL,
            1,
            "stream_timeout",
            "must not be negative",
        )

    def test_stream_idle_timeout(self) -> None:
        self.fails(
            "stream_idle_timeout: [1]\n" + MINIMAL,
            1,
            "stream_idle_timeout",
            "expected a number, got a list",
        )

    def test_infinite(self) -> None:
        self.fails("timeout: .inf\n" + MINIMAL, 1, "timeout", "finite")

    def test_bool_is_not_a_number(self) -> None:
        self.fails(
            "timeout: true\n" + MINIMAL,
            1,
            "timeout",
            "expected a number, got a boolean",
        )

    def test_upstream_timeout(self) -> None:
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
        config = parse_config(
            "stream_timeout: 7\nupstreams:\n  - endpoint: http://a\n    stream_timeout: 0\n",
            "etc/test.yaml",
            {},
        )
        self.assertEqual(config.upstreams[0].stream_timeout, 7.0)

    def test_upstream_timeout_negative(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    timeout: -3\n",
            3,
            "upstreams[0].timeout",
            "must not be negative",
        )

    def test_allow_number(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    allow: 3\n",
            3,
            "upstreams[0].allow",
            "expected a string or a list of strings, got an integer",
        )

    def test_allow_single_string(self) -> None:
        config = parse("upstreams:\n  - endpoint: http://a\n    allow: gpt-4o\n    deny: [gpt-4]\n")
        self.assertEqual(config.upstreams[0].allow, ("gpt-4o",))
        self.assertEqual(config.upstreams[0].deny, ("gpt-4",))

    def test_deny_mapping(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    deny: {a: b}\n",
            3,
            "upstreams[0].deny",
            "expected a string or a list of strings, got a mapping",
        )

    def test_deny_empty_item(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    deny:\n      - gpt-4\n      - ''\n",
            5,
            "upstreams[0].deny[1]",
            "must not be empty",
        )

    def test_noauth_string(self) -> None:
        self.fails(
            'upstreams:\n  - endpoint: http://a\n    noauth: "yes"\n',
            3,
            "upstreams[0].noauth",
            "expected true or false, got a string",
        )

    def test_keep_header_number(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    keep_header: 1\n",
            3,
            "upstreams[0].keep_header",
            "expected true or false, got an integer",
        )

    def test_weight(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    weight: 0\n",
            3,
            "upstreams[0].weight",
            "must be greater than 0",
        )

    def test_int_for_float(self) -> None:
        config = parse("timeout: 7\nupstreams:\n  - endpoint: http://a\n    weight: 3\n")
        self.assertEqual(config.timeout, 7.0)
        self.assertEqual(config.upstreams[0].weight, 3.0)

    def test_max_body_bytes(self) -> None:
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
        self.fails(
            "shutdown_timeout: -1\n" + MINIMAL,
            1,
            "shutdown_timeout",
            "must not be negative",
        )

    def test_hostname_mapping(self) -> None:
        self.fails(
            "hostname: {a: 1}\n" + MINIMAL,
            1,
            "hostname",
            "expected a string, got a mapping",
        )


class UpstreamTests(Helpers):
    def test_no_endpoint(self) -> None:
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
        self.fails(
            "upstreams:\n  - sk: x\n    endpoint:\n",
            3,
            "upstreams[0].endpoint",
            "upstream has no endpoint",
        )

    def test_endpoint_scheme(self) -> None:
        error = self.fails(
            "upstreams:\n  - endpoint: ftp://user:pw@host/v1\n",
            2,
            "upstreams[0].endpoint",
            "must be a URL starting with http:// or https://",
        )
        self.assertNotIn("pw", str(error))

    def test_endpoint_not_a_url(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: api.openai.com\n",
            2,
            "upstreams[0].endpoint",
            "must be a URL",
        )

    def test_endpoint_bad_port(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://h:99999/\n",
            2,
            "upstreams[0].endpoint",
            "not a valid URL",
        )

    def test_endpoint_no_host(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: 'http:///v1'\n",
            2,
            "upstreams[0].endpoint",
            "no host",
        )

    def test_endpoint_query(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://h/v1?x=1\n",
            2,
            "upstreams[0].endpoint",
            "must not have a query or fragment",
        )

    def test_endpoint_trailing_slash(self) -> None:
        config = parse(
            "upstreams:\n  - endpoint: https://openrouter.ai/api/v1/\n  - endpoint: http://h/\n"
        )
        self.assertEqual(
            [u.endpoint for u in config.upstreams],
            ["https://openrouter.ai/api/v1", "http://h"],
        )

    def test_sk_forms(self) -> None:
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
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    type: azure\n",
            3,
            "upstreams[0].type",
            "unknown type 'azure'; expected one of: openai",
        )

    def test_replicate(self) -> None:
        self.fails(
            "upstreams:\n  - endpoint: http://a\n  - type: replicate\n",
            3,
            "upstreams[1].type",
            "type 'replicate' is not supported yet",
        )

    def test_upstreams_missing(self) -> None:
        error = self.fails("timeout: 1\n", None, "upstreams", "no upstreams are configured")
        self.assertEqual(str(error), f"{PATH}: upstreams: no upstreams are configured")

    def test_upstreams_empty(self) -> None:
        self.fails("timeout: 1\nupstreams: []\n", 2, "upstreams", "no upstreams are configured")

    def test_upstreams_null(self) -> None:
        self.fails("timeout: 1\nupstreams:\n", 2, "upstreams", "no upstreams are configured")

    def test_upstreams_mapping(self) -> None:
        self.fails(
            "upstreams:\n  endpoint: http://a\n",
            1,
            "upstreams",
            "expected a list of upstreams, got a mapping",
        )

    def test_upstream_not_a_mapping(self) -> None:
        self.fails(
            "upstreams:\n  - http://a\n",
            2,
            "upstreams[0]",
            "expected an upstream mapping, got a string",
        )


class UpstreamNameTests(Helpers):
    def test_defaults(self) -> None:
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
        self.fails(
            "upstreams:\n  - endpoint: http://a\n    name: ''\n",
            3,
            "upstreams[0].name",
            "must not be empty",
        )


class PolicyTests(Helpers):
    def test_lb_policy_later(self) -> None:
        for policy in ("round_robin", "weighted", "least_latency"):
            self.fails(
                f"lb_policy: {policy}\n" + MINIMAL,
                1,
                "lb_policy",
                f"'{policy}' is not supported yet",
            )

    def test_lb_policy_unknown(self) -> None:
        self.fails(
            "lb_policy: fastest\n" + MINIMAL,
            1,
            "lb_policy",
            "unknown value 'fastest'; expected one of: order, random",
        )

    def test_dbtype(self) -> None:
        self.fails(
            "dbtype: mysql\n" + MINIMAL,
            1,
            "dbtype",
            "expected one of: sqlite, postgres, none",
        )
        self.assertEqual(parse("dbtype: none\n" + MINIMAL).dbtype, "none")
        self.assertEqual(parse("dbaddr: /var/lib/x.sqlite\n" + MINIMAL).dbaddr, "/var/lib/x.sqlite")

    def test_postgres_needs_dbaddr(self) -> None:
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

    def test_rotate(self) -> None:
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
        self.assertEqual(parse_size("100MB"), 100 * 1024 * 1024)
        self.assertEqual(parse_size("10KB"), 10 * 1024)
        self.assertEqual(parse_size("10k"), 10 * 1024)
        self.assertEqual(parse_size("2 GiB"), 2 * 1024**3)
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("512B"), 512)
        for bad in ("", "MB", "1.5MB", "10 XB", "-1", "0", "10iB"):
            self.assertRaises(ValueError, parse_size, bad)

    def test_records_types(self) -> None:
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
        config = parse("admin_key: ${ADMIN}\n" + MINIMAL, {"ADMIN": ""})
        self.assertIsNone(config.admin_key)


class ListenTests(Helpers):
    def test_forms(self) -> None:
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
        config = parse("authorization: k\nlisten: ':8888'\n" + MINIMAL)
        self.assertEqual(config.listen, ("tcp:8888",))

    def test_listen_list(self) -> None:
        config = parse("listen:\n  - 127.0.0.1:8080\n  - unix:/tmp/s\n" + MINIMAL)
        self.assertEqual(config.listen, ("tcp:8080:interface=127.0.0.1", "unix:/tmp/s"))

    def test_bad_listen_item(self) -> None:
        self.fails(
            "listen:\n  - tcp:8080:interface=127.0.0.1\n  - tpc:8081\n" + MINIMAL,
            3,
            "listen[1]",
            "unknown endpoint type 'tpc'",
        )

    def test_bad_listen(self) -> None:
        self.fails("listen: tcp:http\n" + MINIMAL, 1, "listen", "the port must be a number")
        self.fails("listen: []\n" + MINIMAL, 1, "listen", "no listen address")
        self.fails(
            "listen: 8888\n" + MINIMAL,
            1,
            "listen",
            "expected a string or a list of strings, got an integer",
        )

    def test_is_loopback(self) -> None:
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
        error = self.fails(
            "timeout: 5\nlisten: tcp:8888\n" + MINIMAL,
            2,
            "listen",
            "refusing to start an open relay",
        )
        self.assertIn("'tcp:8888'", error.message)

    def test_refused_in_list(self) -> None:
        self.fails(
            "listen: [unix:/tmp/s, '0.0.0.0:80']\n" + MINIMAL,
            1,
            "listen",
            "'tcp:80:interface=0.0.0.0' is not a loopback listener",
        )

    def test_openai_api_route_address_without_keys(self) -> None:
        self.fails(
            "address: ':8888'\n" + MINIMAL,
            1,
            "address",
            "refusing to start an open relay",
        )

    def test_systemd_refused(self) -> None:
        self.fails("listen: systemd:domain=INET:index=0\n" + MINIMAL, 1, "listen", "open relay")

    def test_loopback_allowed(self) -> None:
        for listen in (
            "tcp:8888:interface=127.0.0.1",
            "unix:/tmp/s",
            "'[::1]:80'",
            "localhost:8080",
        ):
            parse(f"listen: {listen}\n" + MINIMAL)
        parse(MINIMAL)

    def test_global_keys_allowed(self) -> None:
        parse("authorization: k\nlisten: tcp:8888\n" + MINIMAL)

    def test_upstream_keys_allowed(self) -> None:
        parse("listen: tcp:8888\nupstreams:\n  - endpoint: http://a\n    authorization: guest\n")

    def test_noauth_upstream_allowed(self) -> None:
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
