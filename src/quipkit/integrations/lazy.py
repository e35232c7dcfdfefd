"""Run a registration right after another library's module is imported, without importing it.

Importing transformers' quantizer registry or PEFT costs seconds, so `import quipkit` imports
neither: `after_import` registers at once if the module is already imported, and otherwise wraps
the module's loader (a one-shot import hook) so the registration runs as soon as the module has
executed, before any user code can use it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Callable


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `name` like the normal finders do, then wraps its loader so `register` runs after it executed."""

    def __init__(self, name: str, register: Callable[[Any], None]) -> None:
        self.name, self.register = name, register

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            self.register(module)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def after_import(name: str, register: Callable[[Any], None]) -> None:
    """Call `register(module)` for module `name` now if it is imported, else right after it is."""
    if name in sys.modules:
        register(sys.modules[name])
    elif not any(isinstance(f, _RegisterAfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(name, register))
