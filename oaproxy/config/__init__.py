"""The configuration file: YAML in, frozen attrs objects out.

The file is a superset of openai-api-route's ``config.yaml``: a file written
for it loads here and means the same (``authorization`` as a comma string,
upstream ``authorization`` scoping, inherited timeouts, ``address`` as the
listen address).  Every problem is a ``ConfigError`` naming the file, the line
of the offending key and the key's dotted path, on one line, so that
``twistd`` can refuse to start with a message that points at the mistake.

Conventions that hold everywhere in the file:

  - An explicit ``null`` (``key:`` with nothing after it) means the same as
    leaving the key out: the default applies.
  - ``${NAME}`` in any string value is replaced by the environment variable
    ``NAME``; ``${NAME:-word}`` and ``${NAME:+word}`` work as in the shell,
    and ``$${`` stands for a literal ``${`` (``interpolation`` says exactly
    what is supported).  Replacement happens on the scalar's text after YAML
    parsing, so a variable's content is never parsed as YAML.  Mapping keys
    are not interpolated.
  - Number and boolean settings take YAML numbers and booleans.  A string is
    accepted for them only when the whole value is one ``${…}``: an
    environment variable can only ever hold text, and refusing
    ``timeout: ${TIMEOUT}`` would make interpolation useless for numbers.
  - String settings take any non-null scalar as its text (``sk: 123456``,
    ``authorization: 12345678``), as openai-api-route's Go YAML decoder does.
    List settings (``allow``, ``deny``, ``listen``, ``trusted_proxies``) are
    stricter: their items must be YAML strings, so ``allow: 3`` is an error.
    Inside YAML flow collections (``[…]``, ``{…}``) a ``${NAME}`` must be quoted,
    because ``{`` is YAML syntax there.
  - Keys are counted from 0 in paths: ``upstreams[0]`` is the first upstream.
  - Secret values (keys, ``sk``, tokens, DSNs, URLs) never appear in messages;
    only the key that holds them does.

The modules: ``model`` (the attrs classes: every key and default),
``schema`` (field metadata, allowed keys, reading a section), ``values`` (the
kinds of value: numbers, URLs, sizes…), ``nodes`` (YAML nodes with their
lines), ``interpolation`` (``${…}``), ``listen`` (endpoint strings, the open-relay check) and
``loader`` (``load_config``, and what depends on more than one key).

Adding a key: one attrs field on its section's class in ``model``, whose
default is the default and whose metadata says how it is read, e.g.
``retries: int = field(default=2, metadata=read(integer))``.  The allowed
keys, unknown-key errors and null-means-default follow.  A new kind of value
is one reader ``(nodes, item) -> value`` in ``values``.  A nested section is
one more ``@frozen`` class written the same way, held by a field with
``metadata=section(Limits, "a mapping of limit settings")``
(``named_sections`` for ``{name: mapping}``).  Only a value that depends on
other keys needs code in ``loader`` (``metadata=read_by_loader()``).  Show
the key in ``etc/config.yaml``: a test checks that every key is there.
"""

from oaproxy.config.errors import ConfigError
from oaproxy.config.listen import check_listeners, is_loopback_endpoint, parse_listen
from oaproxy.config.loader import load_config, parse_config
from oaproxy.config.model import (
    DBTYPES,
    DEFAULT_LISTEN,
    POSTGRES,
    SQLITE,
    BackendErrorPolicy,
    BreakerConfig,
    Budget,
    BudgetPeriod,
    CacheBackend,
    CacheConfig,
    ClientKey,
    Config,
    ContentFilterConfig,
    FeishuConfig,
    LbPolicy,
    LimiterBackend,
    Limits,
    MatrixConfig,
    NotifyConfig,
    Price,
    RecordsPolicy,
    ResumeMode,
    RouteSettings,
    Upstream,
    UpstreamType,
    WindowStrategy,
    all_client_keys,
    key_digest,
    key_fingerprint,
)
from oaproxy.config.rates import Rate, parse_rates
from oaproxy.config.values import parse_size

__all__ = [
    "DBTYPES",
    "DEFAULT_LISTEN",
    "POSTGRES",
    "SQLITE",
    "BackendErrorPolicy",
    "BreakerConfig",
    "Budget",
    "BudgetPeriod",
    "CacheBackend",
    "CacheConfig",
    "ClientKey",
    "Config",
    "ConfigError",
    "ContentFilterConfig",
    "FeishuConfig",
    "LbPolicy",
    "LimiterBackend",
    "Limits",
    "MatrixConfig",
    "NotifyConfig",
    "Price",
    "Rate",
    "RecordsPolicy",
    "ResumeMode",
    "RouteSettings",
    "Upstream",
    "UpstreamType",
    "WindowStrategy",
    "all_client_keys",
    "check_listeners",
    "is_loopback_endpoint",
    "key_digest",
    "key_fingerprint",
    "load_config",
    "parse_config",
    "parse_listen",
    "parse_rates",
    "parse_size",
]
