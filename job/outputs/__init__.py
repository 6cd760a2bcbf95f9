"""Stage 3, the outputs: the exported model (``export``: MXNet, ``onnx_export``, ``triton``),
its evaluation (``evaluate``, ``evaluation``, ``report``), batch ``predict``ions, the run
registry and its promotion gate (``registry``) and the pipeline metrics document."""
