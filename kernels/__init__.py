"""Packed OWQ format and compute: packing, `OWQLinear`, torch twins and CUDA kernels.

Imported by both the quantizer and the server; imports neither.
"""

from .owq_linear import OWQLinear
from .packing import dequantize, pack_codes, pack_zeros, unpack_codes, unpack_zeros

__all__ = ["OWQLinear", "dequantize", "pack_codes", "pack_zeros", "unpack_codes", "unpack_zeros"]
