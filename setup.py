"""Build hook for quipkit's compiled helpers (E8P search, Viterbi, decode kernels); metadata is in pyproject.toml.

The extension is plain C on raw buffers, so it needs no torch headers and builds in pip's isolated
environment. It is optional: without a C compiler quipkit installs and uses slower torch code.
"""

from setuptools import Extension, setup

native = Extension(
    "quipkit._native",
    sources=[f"src/quipkit/_native/{name}.c" for name in
             ("module", "e8p", "viterbi", "decoder_step", "threads", "isa", "kernels_generic", "kernels_avx2",
              "kernels_avx512")],
    depends=[f"src/quipkit/_native/{name}.h" for name in
             ("native", "viterbi_step", "kernels", "kernels_common", "kernels_generic")],
    extra_compile_args=["-O3", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread", "-ldl"],
    optional=True,
)

setup(ext_modules=[native])
