"""Stage 2, training: the process on every rank (``lifecycle``) builds the parts (``build``:
``model``, ``distributed``) and runs the loop (``loop``) under the step ``watchdog``, with
``checkpoint``s, ``progress`` lines, Prometheus ``metrics`` and, at the end, the ``summary``."""
