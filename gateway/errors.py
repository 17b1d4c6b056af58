"""The gateway's exception tree; each protocol boundary maps it in one place.

    GatewayError
     ├── ConfigError          the configuration is wrong: stop at start-up, name file and key
     ├── VolumeInUseError     another gateway already runs on this D:: stop at start-up
     ├── TransientError       try again later (another node, backoff)
     │    └── MailNodeError   one mail node failed (connect, TLS, timeout, 4xx)
     └── PermanentError       retrying cannot help
          ├── RejectedError   a mail server refused for good (5xx): the transfer fails with the reply
          └── QuarantineError inbound input that must not be ingested; `reason` is for the operator

Messages never carry patient data: only UIDs, ids, sizes and protocol replies.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration file is missing, malformed or inconsistent."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem


class VolumeInUseError(GatewayError):
    """Another gateway process holds the working volume (`d_root`)."""


class TransientError(GatewayError):
    """A failure that may go away: retry later."""


class MailNodeError(TransientError):
    """One mail node could not serve the request; another node may."""

    def __init__(self, node: str, problem: str) -> None:
        super().__init__(f"{node}: {problem}")
        self.node = node
        self.problem = problem


class PermanentError(GatewayError):
    """A failure that retrying cannot fix."""


class RejectedError(PermanentError):
    """A mail server rejected the message for good (5xx)."""


class QuarantineError(PermanentError):
    """Inbound input that must not be ingested; kept aside with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
