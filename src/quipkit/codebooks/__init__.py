"""Codebooks (number formats) by name. Importing this package registers every built-in codebook."""

from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import CODEBOOKS, make_codebook, register_codebook
from quipkit.codebooks import dense, e8p, ggml_blocks, icquant, row_table, rvq, scalar, trellis  # noqa: F401  (registers)

__all__ = ["Codebook", "Params", "CODEBOOKS", "make_codebook", "register_codebook"]
