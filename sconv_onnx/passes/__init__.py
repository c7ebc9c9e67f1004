"""Rewrite passes, one module per structure family (find -> plan -> rewrite)."""

from . import structured_conv, structured_conv_transpose, structured_linear

PASSES = (structured_conv, structured_conv_transpose, structured_linear)

__all__ = ["PASSES", "structured_conv", "structured_conv_transpose", "structured_linear"]
