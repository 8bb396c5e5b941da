"""Errors a finance user or a customer can fix; each message is one clear line."""

from __future__ import annotations


class LinkError(Exception):
    """A request that finance staff or a customer can fix; the message is one clear line."""


class NotFound(LinkError):
    pass
