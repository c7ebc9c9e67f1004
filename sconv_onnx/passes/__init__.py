"""Rewrite passes, one module per structure family (find -> plan -> rewrite)."""

from . import structured_conv

PASSES = (structured_conv,)

__all__ = ["PASSES", "structured_conv"]
