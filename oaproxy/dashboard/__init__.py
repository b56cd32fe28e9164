"""The dashboard under ``/admin/ui/``: HTML pages the daemon renders itself
(escaped by default, charts as inline SVG, one small script and one style
sheet of this package), on the admin API's state and the SQL store.

- ``session``: the admin key checked, the signed session cookie, CSRF tokens;
- ``sessiontables``: the sessions' secret and logouts in the SQL store, for
  every process on it;
- ``markup``: escaping by default (``Markup``, ``html``);
- ``charts``: inline SVG charts;
- ``data``: what each page reads of the store (indexed, the sums of
  ``oaproxy.sinks.rollup``, no full scan);
- ``pages``: each page's HTML; ``forms``: the Upstreams and Keys forms;
- ``resource``: the routes, the door (login, CSRF, headers).
"""
