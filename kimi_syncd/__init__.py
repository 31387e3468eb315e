"""kimi-syncd: a durable, offline-first sync daemon for the Kimi Proxy Dashboard's /ws stream."""

__version__ = "0.1.0"
