"""Deterministic builders of example and benchmark models (installed as ``sconv_onnx.models``).

Every builder is seeded and generates its weights with numpy: no binary is
committed, and the same call always yields the same model.
"""
