"""Streaming, transaction-level replication for ZODB FileStorage.

A primary tails a ``Data.fs`` transaction by transaction and streams each
committed transaction over mutual TLS to secondaries, which re-commit it
through the ZODB storage API into their own FileStorage.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
