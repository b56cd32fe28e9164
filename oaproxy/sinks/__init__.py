"""Record sinks: observers of ``oaproxy.record`` events that store the records.

Each sink is a ``twisted.application.service.Service`` with an ``observer``
(an ``ILogObserver``) of the records' own publisher, never the global one
(``records.RecordEmitter``); ``generation.swap_in`` wires both::

    sink = FileSink("log/records.jsonl", spool_dir="log/spool")
    sink.setServiceParent(daemon)
    shared.records.add_observer(sink.observer)

``RedisSink`` lives in ``oaproxy.sinks.redis`` and is imported from there
(txredisapi installs the global reactor when imported).
"""

from oaproxy.record import encode_record
from oaproxy.sinks.file import FileSink
from oaproxy.sinks.queue import RECORD_NAMESPACE, QueuedSink, RecordObserver
from oaproxy.sinks.sql import SQLSink, connection_pool, migrate, open_database

__all__ = [
    "RECORD_NAMESPACE",
    "FileSink",
    "QueuedSink",
    "RecordObserver",
    "SQLSink",
    "connection_pool",
    "encode_record",
    "migrate",
    "open_database",
]
