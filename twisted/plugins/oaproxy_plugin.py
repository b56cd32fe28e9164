"""twistd plugin: ``twistd -n oaproxy --config etc/config.yaml``."""

from twisted.application.service import ServiceMaker

oaproxy = ServiceMaker(
    "oaproxy",
    "oaproxy.tap",
    "OpenAI-compatible reverse proxy with failover",
    "oaproxy",
)
