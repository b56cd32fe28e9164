"""Settings changed while oaproxy runs: the admin API (``/admin/``), the CLI's
``upstreams`` and ``keys`` commands, and the SQL store both write, which every
daemon on that store follows.

- ``stored``: the store's rows as values (``StoreSnapshot``);
- ``tables``: the store's SQL, on a DB-API cursor (the daemon's adbapi
  threads and the CLI alike);
- ``sealing``: upstream keys encrypted with ``store_key``;
- ``overlay``: the config file and the store together, one ``Config``;
- ``changes``: each change (add an upstream, disable one, add a key…),
  checked like the config file, with its audit entry;
- ``describe``: upstreams and keys as the API shows them, never a secret;
- ``follower``: the daemon's link to the store: changes taken at once,
  those of others noticed within ``store_poll_interval`` seconds;
- ``resource`` and ``queries``: the HTTP API; ``commands``: the CLI.
"""
