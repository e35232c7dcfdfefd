"""PEFT integration: LoRA adapters on quipkit's quantized layers (QLoRA for 2-bit models).

`get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))` wraps a QuantizedLinear as it
wraps an nn.Linear: the adapter's low-rank term is added to the layer's output. The codes are buffers,
so they stay as they are; gradients reach the adapters, and earlier layers' adapters through the
decode kernels' backward. Merging an adapter into the codes would need re-quantizing, so `merge` is
refused with one line that says what to do instead.

PEFT picks a LoRA layer per base layer type from a fixed list; quipkit puts its own choice first for
its layers (every other type goes on to PEFT's list), right after `peft.tuners.lora.model` is
imported (`lazy.after_import`), so nothing changes on the user's side and `import quipkit` does not
import PEFT.
"""

from __future__ import annotations

import functools
from typing import Any

from quipkit.integrations.lazy import after_import

_LORA_MODEL = "peft.tuners.lora.model"


def _register(module: Any) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from quipkit.layers.quantized_linear import QuantizedLinear

    create = module.LoraModel._create_new_module
    if getattr(create, "quipkit", False):
        return

    def create_new_module(lora_config: Any, adapter_name: str, target: Any, **kwargs: Any) -> Any:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, QuantizedLinear):
            return quantized_lora_linear()(target, adapter_name, config=lora_config, **kwargs)
        return create(lora_config, adapter_name, target, **kwargs)

    create_new_module.quipkit = True  # type: ignore[attr-defined]
    module.LoraModel._create_new_module = staticmethod(create_new_module)


@functools.cache
def quantized_lora_linear() -> type:
    """The LoRA layer class for a QuantizedLinear base (built on first use: it derives from PEFT's classes)."""
    import torch
    from peft.tuners.lora.layer import LoraLayer
    from torch import Tensor, nn

    class QuantizedLoraLinear(nn.Module, LoraLayer):
        """y = base(x) + scaling * B(A(dropout(x))) for each active adapter; the base's codes stay fixed."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1,
                     **kwargs: Any) -> None:
            for option in ("use_dora", "lora_bias"):
                if getattr(config, option, False):
                    raise ValueError(f"LoRA on quipkit's quantized layers does not support {option}=True; leave it off")
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, None]:
            return base_layer.qweight.device, None  # on the layer's device; float32, as PEFT keeps low-precision bases' adapters

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if kwargs.get("adapter_names") is not None:
                raise ValueError("LoRA on quipkit's quantized layers applies the active adapters to the whole batch; "
                                 "call set_adapter instead of passing adapter_names")
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                down, up = self.lora_A[name], self.lora_B[name]
                update = up(down(self.lora_dropout[name](x.to(down.weight.dtype)))) * self.scaling[name]
                result = result + update.to(result.dtype)
            return result

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise ValueError("a LoRA adapter cannot be merged into quipkit's quantized codes; use the model "
                             "unmerged, or merge the adapter into the float model and quantize that")

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuantizedLoraLinear


def install() -> None:
    """Put quipkit's LoRA layer first for quantized layers once PEFT's LoRA is imported."""
    after_import(_LORA_MODEL, _register)
