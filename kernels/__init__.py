"""Packed OWQ format and compute: packing, `OWQLinear`, torch twins and CUDA kernels.

Imported by both the quantizer and the server; imports neither. Installed as `owq.kernels`.
"""

if __name__ == "kernels":
    # A checkout's root is on sys.path (`python -c` or `python -m` run from it) and something
    # imported the top-level name `kernels`, which is PyPI's `kernels` package (transformers
    # imports it): this directory must not shadow it, so hand the importer that package.
    from ._shadow import load_shadowed

    load_shadowed(__name__, __file__)
else:
    from .owq_linear import OWQLinear
    from .packing import dequantize, pack_codes, pack_zeros, unpack_codes, unpack_zeros

    __all__ = [
        "OWQLinear", "dequantize", "pack_codes", "pack_zeros", "unpack_codes", "unpack_zeros",
    ]  # fmt: skip
