"""Offline half of owq: calibration, RTN / GPTQ / OWQ quantization into a checkpoint directory,
perplexity evaluation, weak-column plans and weak column tuning (`tuning/`).

Imports `owq.kernels` (format and compute) and `owq.builtin` (default model and corpus); never
`owq.server`, and nothing from the `owq` command line root.
"""
