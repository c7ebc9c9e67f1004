"""``python -m sconv_onnx``: the same as the ``sconv-onnx`` command."""

from .cli import main

raise SystemExit(main())
