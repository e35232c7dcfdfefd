"""Text corpora: the bundled WikiText-2 and C4 files, any local .txt/.jsonl file, and hub datasets.

The bundled files (see data/README.md for sources and licenses) make calibration and evaluation
work on a machine without a dataset hub. Calibration text never overlaps evaluation text:
calibrate on WikiText-2 validation and the first 1,000 C4 documents, evaluate on WikiText-2 test
and the last 1,000.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from quipkit.errors import QuipkitError, missing_dependency

DATA_DIR = Path(__file__).parent / "data"
C4_FILE = DATA_DIR / "c4" / "validation_2k.jsonl"
C4_SPLIT = 1000  # documents [0, 1000) calibrate, [1000, 2000) evaluate


def _jsonl_texts(path: Path, field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise QuipkitError(f"{path}:{number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise QuipkitError(f"{path}:{number} has no string field '{field}'")
            texts.append(row[field])
    return texts


@lru_cache(maxsize=4)
def wikitext2(split: str) -> str:
    """WikiText-2 raw `split` ('test' or 'validation') as one string: the rows concatenated, which is
    the original wiki.*.raw file (each row already ends in a newline)."""
    path = DATA_DIR / "wikitext2" / f"{split}.jsonl"
    if not path.is_file():
        raise QuipkitError(f"bundled WikiText-2 split '{split}' not found at {path}; reinstall quipkit")
    return "".join(_jsonl_texts(path))


@lru_cache(maxsize=1)
def c4_documents() -> tuple[str, ...]:
    """The 2,000 bundled C4 validation documents, in file order."""
    return tuple(_jsonl_texts(C4_FILE))


def c4_calibration_text() -> str:
    return "\n\n".join(c4_documents()[:C4_SPLIT])


def c4_evaluation_text() -> str:
    return "\n\n".join(c4_documents()[C4_SPLIT:])


def file_text(path: str | Path) -> str:
    """A local .txt file verbatim, or a .jsonl file's "text" fields joined with blank lines."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QuipkitError(f"no such text file: {path}; check the path")
    if p.suffix == ".jsonl":
        return "\n\n".join(_jsonl_texts(p))
    if p.suffix in (".txt", ".md", ".raw", ""):
        return p.read_text(encoding="utf-8")
    raise QuipkitError(f"{path}: unsupported text file type '{p.suffix}'; use .txt or .jsonl")


def hub_text(spec: str) -> str:
    """`hf:NAME[:CONFIG]:SPLIT` from the Hugging Face hub (needs `datasets` and network), texts joined."""
    if importlib.util.find_spec("datasets") is None:
        raise missing_dependency("datasets", f"loading '{spec}' from the hub")
    import datasets

    parts = spec.split(":")[1:]
    if len(parts) not in (2, 3):
        raise QuipkitError(f"hub text '{spec}' must look like hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types; all mean "could not get it"
        raise QuipkitError(f"could not load '{spec}' from the hub: {str(err).splitlines()[0]}") from None
    column = "text" if "text" in data.column_names else data.column_names[0]
    return "\n\n".join(str(t) for t in data[column])


CALIBRATION_SOURCES = {"wikitext2": lambda: wikitext2("validation"), "c4": c4_calibration_text}


def calibration_text(source: str) -> str:
    """Text of a calibration source: 'wikitext2', 'c4', a file path, or hf:NAME:SPLIT."""
    if source in CALIBRATION_SOURCES:
        return CALIBRATION_SOURCES[source]()
    if source.startswith("hf:"):
        return hub_text(source)
    return file_text(source)
