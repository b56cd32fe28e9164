"""The Redis record sink: a stream of records plus per-day usage counters.

Per record, a Lua script runs atomically on the server (one ``EVAL`` for
up to about 1 MiB of records of a batch, so that a batch costs a few round
trips, not one per record)::

    XADD {key} MAXLEN ~ {maxlen} * record {json}
    HINCRBY oaproxy:usage:{YYYY-MM-DD}:key:{key_name}  requests 1,
            prompt_tokens, completion_tokens, cost_microusd
    HINCRBY oaproxy:usage:{YYYY-MM-DD}:model:{model}   (the same fields)
    EXPIRE  both hashes 35 days

guarded by ``SET {key}:seen:{id} 1 NX EX {dedupe_ttl}``: a record whose
reply was lost (Redis killed mid-batch, our deadline fired) and that is
written again is neither added nor counted twice.  The date is the UTC date
of the record's ``time``; a missing key name or model counts as ``"-"``.
"""

from __future__ import annotations

import datetime
import math
from typing import Any
from urllib.parse import unquote, urlsplit

from attrs import frozen
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from oaproxy.record import Record, encode_record
from oaproxy.sinks.queue import QueuedSink

USAGE_TTL = 35 * 24 * 3600

# What script_arguments gives per record: 4 keys (seen, stream, the two
# usage hashes), then 7 arguments.
_KEYS_PER_RECORD = 4
_SCRIPT = """
local written = 0
for r = 0, #KEYS / 4 - 1 do
  local k, a = r * 4, r * 7
  if redis.call('SET', KEYS[k + 1], '1', 'NX', 'EX', ARGV[a + 3]) then
    redis.call('XADD', KEYS[k + 2], 'MAXLEN', '~', ARGV[a + 2], '*', 'record', ARGV[a + 1])
    for i = 3, 4 do
      redis.call('HINCRBY', KEYS[k + i], 'requests', 1)
      redis.call('HINCRBY', KEYS[k + i], 'prompt_tokens', ARGV[a + 5])
      redis.call('HINCRBY', KEYS[k + i], 'completion_tokens', ARGV[a + 6])
      redis.call('HINCRBY', KEYS[k + i], 'cost_microusd', ARGV[a + 7])
      redis.call('EXPIRE', KEYS[k + i], ARGV[a + 4])
    end
    written = written + 1
  end
end
return written
"""
#: Records' JSON per ``EVAL``, about: one command never holds a huge batch.
EVAL_BYTES = 1024 * 1024


@frozen
class RedisAddress:
    """Where a ``redis://[user:password@]host:port/db`` URL points."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError("redis URL must look like redis://host:port/db")
        path = parts.path.strip("/")
        try:
            db = int(path) if path else 0
            port = parts.port or 6379
        except ValueError:
            raise ValueError("redis URL must look like redis://host:port/db") from None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def usage_date(record: Record) -> str:
    """The UTC day a record counts for, ``YYYY-MM-DD``."""
    utc = datetime.timezone.utc
    return datetime.datetime.fromtimestamp(record.time, utc).strftime("%Y-%m-%d")


def batched_arguments(per_record: list[list[object]]) -> list[list[object]]:
    """The ``EVAL`` arguments (after the script) of ``script_arguments``'
    records, grouped: about ``EVAL_BYTES`` of records' JSON per ``EVAL``."""
    batches: list[list[object]] = []
    keys: list[object] = []
    values: list[object] = []
    size = 0

    def close() -> None:
        if keys:
            batches.append([len(keys), *keys, *values])

    for arguments in per_record:
        record_json = arguments[1 + _KEYS_PER_RECORD]
        assert isinstance(record_json, bytes)
        if keys and size + len(record_json) > EVAL_BYTES:
            close()
            keys, values, size = [], [], 0
        keys.extend(arguments[1 : 1 + _KEYS_PER_RECORD])
        values.extend(arguments[1 + _KEYS_PER_RECORD :])
        size += len(record_json)
    close()
    return batches


def script_arguments(
    record: Record,
    *,
    key: str,
    maxlen: int,
    usage_prefix: str,
    dedupe_ttl: int,
) -> list[object]:
    """The ``EVAL`` arguments (after the script) writing one record."""
    usage = record.usage
    cost = record.cost
    cost_micro = round(cost * 1e6) if cost is not None and math.isfinite(cost) else 0
    date = usage_date(record)
    key_name = record.key_name or "-"
    model = record.model or "-"
    return [
        4,
        f"{key}:seen:{record.id}",
        key,
        f"{usage_prefix}:{date}:key:{key_name}",
        f"{usage_prefix}:{date}:model:{model}",
        encode_record(record),
        maxlen,
        dedupe_ttl,
        USAGE_TTL,
        usage.prompt_tokens if usage is not None else 0,
        usage.completion_tokens if usage is not None else 0,
        cost_micro,
    ]


class RedisSink(QueuedSink):
    """Writes records to a Redis stream (``XADD key MAXLEN ~ maxlen``) and
    counts usage per day, key and model.

    Parameters:

    - ``url``: ``redis://host:port/db``.
    - ``key``: the stream.
    - ``maxlen``: approximate stream length kept.
    - ``dedupe_ttl``: seconds a record id is remembered against double
      writes on retry.
    - ``threadpool``: where each batch's script arguments (the JSON of its
      records) are built, off the reactor; by default one thread of the
      sink's own, started and stopped with it.
    - ``options``: further ``QueuedSink`` options.
    """

    def __init__(
        self,
        url: str,
        *,
        spool_dir: str,
        key: str = "oaproxy:records",
        maxlen: int = 100000,
        usage_prefix: str = "oaproxy:usage",
        dedupe_ttl: int = 86400,
        connect_timeout: float = 5.0,
        reactor: Any = None,
        threadpool: ThreadPool | None = None,
        queue_size: int = 10000,
        name: str = "redis",
        **options: Any,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.address = RedisAddress.from_url(url)
        self.key = key
        self.maxlen = maxlen
        self.usage_prefix = usage_prefix
        self.dedupe_ttl = dedupe_ttl
        self.connect_timeout = connect_timeout
        self._reactor = reactor
        self._factory: Any = None
        self._own_threads = threadpool is None
        self._threads = (
            ThreadPool(minthreads=1, maxthreads=1, name=f"oaproxy-{name}-encoder")
            if threadpool is None
            else threadpool
        )
        clock: IReactorTime = reactor
        super().__init__(
            name=name,
            spool_dir=spool_dir,
            clock=clock,
            queue_size=queue_size,
            **options,
        )

    def open_backend(self) -> None:
        # Imported here: txredisapi installs the global reactor on import.
        import txredisapi

        address = self.address
        factory = txredisapi.RedisFactory(
            f"{address.host}:{address.port}",
            address.db,
            1,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            password=address.password,
            username=address.username,
        )
        factory.reconnect = True
        # Reconnect within a few seconds of Redis coming back.
        factory.maxDelay = 5
        if self._own_threads:
            self._threads.start()
        factory.startConnecting(
            HostnameEndpoint(
                self._reactor, address.host, address.port, timeout=self.connect_timeout
            )
        )
        self._factory = factory

    def _connection(self) -> Any:
        factory = self._factory
        if factory is None or not factory.size:
            # txredisapi would wait for a connection indefinitely; failing
            # at once lets the records wait in our queue (and spill).
            raise ConnectionError("redis is not connected")
        return factory.handler

    def write_batch(self, records: list[Record]) -> Deferred[object]:
        self._connection()
        encoding = deferToThreadPool(self._reactor, self._threads, self._arguments, records)
        return encoding.addCallback(self._send)

    def _arguments(self, records: list[Record]) -> list[list[object]]:
        """The batch's ``EVAL`` arguments (in the thread pool)."""
        return batched_arguments(
            [
                script_arguments(
                    record,
                    key=self.key,
                    maxlen=self.maxlen,
                    usage_prefix=self.usage_prefix,
                    dedupe_ttl=self.dedupe_ttl,
                )
                for record in records
            ]
        )

    def _send(self, arguments: list[list[object]]) -> Deferred[object]:
        # Asked again: the connection may have gone while the thread worked.
        redis = self._connection()
        writes = [redis.execute_command("EVAL", _SCRIPT, *each) for each in arguments]
        done: Deferred[object] = gatherResults(writes, consumeErrors=True)  # type: ignore[assignment]
        return done

    def close_backend(self) -> Deferred[object] | None:
        if self._own_threads and self._threads.started:
            self._threads.stop()
        factory, self._factory = self._factory, None
        if factory is None:
            return None
        result: Deferred[object] = factory.disconnect()
        return result
