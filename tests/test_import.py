import subprocess
import sys


def test_import_is_lean():
    """`import quipkit` loads neither torch nor transformers nor triton, and initialises no CUDA."""
    code = "import sys, quipkit; print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_transformers_learns_the_quipkit_method_when_it_loads_its_registry():
    code = (
        "import quipkit\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "print('quipkit' in AUTO_QUANTIZER_MAPPING and 'quipkit' in AUTO_QUANTIZATION_CONFIG_MAPPING)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
