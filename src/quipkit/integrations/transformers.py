"""transformers integration: `import quipkit` then `AutoModelForCausalLM.from_pretrained(dir)` loads a
quipkit checkpoint, through transformers' `register_quantization_config` / `register_quantizer`.

Importing transformers' quantizer registry costs seconds, so `import quipkit` does not: the
registration runs right after that registry is imported (`lazy.after_import`), which is before any
`from_pretrained` can read a config.
"""

from __future__ import annotations

from typing import Any

from quipkit.integrations.lazy import after_import

_REGISTRY = "transformers.quantizers.auto"


def _register(auto_module: Any) -> None:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from quipkit.formats.checkpoint import (
        FORMAT_VERSION,
        QUANT_METHOD,
        READABLE_VERSIONS,
        replace_embeddings,
        replace_linears,
        upgrade_layers,
    )

    if QUANT_METHOD in auto_module.AUTO_QUANTIZER_MAPPING:
        return

    @auto_module.register_quantization_config(QUANT_METHOD)
    class QuipkitConfig(QuantizationConfigMixin):
        """The `quantization_config` of a quipkit checkpoint, as transformers holds it."""

        def __init__(self, layers: dict[str, Any], format_version: int = FORMAT_VERSION, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.layers = layers
            for key, value in kwargs.items():
                if key != "quant_method":
                    setattr(self, key, value)

    @auto_module.register_quantizer(QUANT_METHOD)
    class QuipkitHfQuantizer(HfQuantizer):
        """Swaps the checkpoint's quantized linears in before transformers loads their buffers."""

        requires_calibration = True

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if self.quantization_config.format_version not in READABLE_VERSIONS:
                raise ValueError(
                    f"quipkit checkpoint format {self.quantization_config.format_version} is not supported "
                    f"by this quipkit (reads {', '.join(map(str, READABLE_VERSIONS))})"
                )

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
            import os

            from huggingface_hub import try_to_load_from_cache

            from quipkit.formats.checkpoint import INDEX, WEIGHTS
            from quipkit.formats.validate import validate_checkpoint

            folder = getattr(model.config, "name_or_path", "")
            if folder and not os.path.isdir(folder):  # a hub id: its files are in the cache by now
                cached = None
                for name in (WEIGHTS, INDEX):  # one file, or shards with their index
                    try:
                        cached = cached if isinstance(cached, str) else try_to_load_from_cache(folder, name)
                    except ValueError:  # not a valid hub id either: nothing to look up
                        break
                folder = os.path.dirname(cached) if isinstance(cached, str) else ""
            if folder and os.path.isdir(folder):  # check the checkpoint before loading a tensor
                validate_checkpoint(folder)
            replace_linears(model, self.quantization_config.layers, getattr(self.quantization_config, "experts", None))
            # embeddings look up in the dtype the model is loaded in (dtype=torch.bfloat16), like nn.Embedding
            dtype = str(model.dtype).removeprefix("torch.")
            embeddings = getattr(self.quantization_config, "embeddings", None) or {}
            replace_embeddings(model, {name: {**spec, "dtype": dtype} for name, spec in embeddings.items()})

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
            upgrade_layers(model, self.quantization_config.format_version)

        def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
            return False

        def is_serializable(self, safe_serialization: bool = True) -> bool:
            return True  # the buffers are the checkpoint's tensors under its names: save_pretrained writes one

        @property
        def is_trainable(self) -> bool:
            return True  # adapters (PEFT LoRA) train through the layers; the codes are buffers and stay fixed


def install() -> None:
    """Register with transformers now if its registry is loaded, else as soon as it is."""
    after_import(_REGISTRY, _register)
