"""``python -m sconv_onnx``: the same as the ``sconv-onnx`` command."""

from .entry import main

raise SystemExit(main())
