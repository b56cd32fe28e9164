"""IP rules: ``ip_allow`` and ``ip_deny``, a head gate before client auth.

The address is the client IP as records see it (the peer, or the
``X-Forwarded-For`` chain walked from the right past ``trusted_proxies``;
see ``oaproxy.web.client_ip``). A denied address gets 403 ``ip_not_allowed``
whatever its key, before its body is parsed; the refusal is recorded.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from attrs import frozen

from oaproxy.config import Config
from oaproxy.errors import ErrorAnswer
from oaproxy.pipeline import Arrival, Verdict

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@frozen
class IPRules:
    # Empty: every address is allowed (unless denied).
    allow: tuple[Network, ...]
    # Checked after allow: an address in both is denied.
    deny: tuple[Network, ...]

    @classmethod
    def from_config(cls, config: Config) -> IPRules | None:
        """The rules of ``config``; None when it has none."""
        if not config.ip_allow and not config.ip_deny:
            return None
        return cls(allow=config.ip_allow, deny=config.ip_deny)

    def admits(self, client_ip: str) -> bool:
        """Whether ``client_ip`` may use the proxy. Something that is no IP
        address (a Unix socket peer) is in no network: it is admitted only
        when there is no allow list."""
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return not self.allow
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d.
            address = address.ipv4_mapped
        if self.allow and not _within(address, self.allow):
            return False
        return not _within(address, self.deny)

    def __call__(self, arrival: Arrival) -> Verdict:
        """The head gate: 403 for an address the rules do not admit."""
        if self.admits(arrival.client_ip):
            return None
        return ErrorAnswer(
            403,
            f"Requests from {arrival.client_ip} are not allowed.",
            type="permission_error",
            code="ip_not_allowed",
        )


def _within(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Sequence[Network]
) -> bool:
    # An IPv4 address is never in an IPv6 network (and the other way round).
    return any(address in network for network in networks)
