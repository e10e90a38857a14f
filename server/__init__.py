"""Online half of owq: the model runtime (`runtime/`), the continuous-batching engine, adapter
registry and slots, and the OpenAI-compatible HTTP API with `owq serve`.

Imports `owq.kernels` (format and compute); never `owq.quantizer`, and nothing from the `owq`
command line root (the built-in default checkpoint is handed in by the caller).
"""
