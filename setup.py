"""Build hook for quipkit's compiled helpers (E8P search, Viterbi); all metadata is in pyproject.toml.

The extension is plain C on raw buffers, so it needs no torch headers and builds in pip's isolated
environment. It is optional: without a C compiler quipkit installs and uses slower torch code.
"""

from setuptools import Extension, setup

native = Extension(
    "quipkit._native",
    sources=["src/quipkit/_native/module.c", "src/quipkit/_native/e8p.c", "src/quipkit/_native/viterbi.c"],
    depends=["src/quipkit/_native/native.h", "src/quipkit/_native/viterbi_step.h"],
    extra_compile_args=["-O3", "-std=c11"],
    optional=True,
)

setup(ext_modules=[native])
