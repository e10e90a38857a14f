"""Weak column tuning (WCT): train per-task copies of a quantized base's fp16 weak columns.

`data` reads and batches task records, `tune` trains and snapshots an adapter, `cli` is
`owq tune`. Imports `owq.kernels` and the built-in model; never the server.
"""
