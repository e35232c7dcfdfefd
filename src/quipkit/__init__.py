"""quipkit: compress LLM weights to 2-4 bits with QuIP, QuIP#, QTIP, GPTQ and RTN.

Importing quipkit is cheap: submodules load on first use, and the transformers integration
registers itself when transformers' quantizer registry is imported, so
`import quipkit; AutoModelForCausalLM.from_pretrained(quantized_dir)` works.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "quantize": "quipkit.api",
    "save": "quipkit.api",
    "load": "quipkit.api",
    "QuantConfig": "quipkit.config",
    "CalibrationConfig": "quipkit.config",
    "make_config": "quipkit.config",
    "QuantizedLinear": "quipkit.layers.quantized_linear",
    "QuipkitError": "quipkit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quipkit' has no attribute '{name}'")


from quipkit.integrations import peft as _peft, transformers as _transformers  # noqa: E402

_transformers.install()
_peft.install()
