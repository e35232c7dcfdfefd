import subprocess
import sys


def test_import_is_lean():
    """`import quipkit` loads neither torch nor transformers nor triton nor peft, and initialises no CUDA."""
    code = "import sys, quipkit; print(sorted(m for m in ('torch', 'transformers', 'triton', 'peft') if m in sys.modules))"
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


def test_peft_picks_quipkits_lora_layer_once_it_imports_lora_in_either_order():
    """Registered right after PEFT's LoRA module is imported, whether quipkit or PEFT came first."""
    check = (
        "from peft.tuners.lora.model import LoraModel\n"
        "print(getattr(LoraModel._create_new_module, 'quipkit', False))"
    )
    for code in ("import quipkit\n" + check, "import peft\nimport quipkit\n" + check):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "True"
