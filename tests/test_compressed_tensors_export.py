"""compressed-tensors export of scalar-grid checkpoints: exact packing, and plain transformers (with the
compressed-tensors package) loads the export with quipkit's logits."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import quipkit
from quipkit.config import make_config
from quipkit.errors import QuipkitError
from quipkit.formats.compressed_tensors_export import export_compressed_tensors, pack_int32
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model
from test_pipeline import CAL, _tokens


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_puts_value_j_of_each_word_at_bits_j_times_b(bits):
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 2**bits, (3, 64), generator=gen)
    words = pack_int32(values, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 64 * bits // 32)
    per = 32 // bits
    back = (words.to(torch.int64)[..., None] >> (torch.arange(per) * bits)) & (2**bits - 1)
    assert torch.equal(back.reshape(3, 64), values)


def _checkpoint(folder, method="gptq", bits=4, **options):
    tokens = _tokens()
    model = tiny_model()
    config = make_config(method, bits, **options)
    report = quantize_blockwise(model, tokens, config, CAL, torch.device("cpu"))
    return quipkit.save(model, None, folder, config, CAL, {"layers": report.layers}), tokens


@pytest.mark.parametrize("method, bits, options", [("gptq", 4, {"group_size": 32}), ("rtn", 8, {"symmetric": True, "group_size": 32}),
                                                   ("gptq", 4, {"group_size": 64, "symmetric": True})])
def test_transformers_loads_the_export_with_quipkits_logits(tmp_path, method, bits, options):
    if importlib.util.find_spec("compressed_tensors") is None:
        pytest.fail("compressed-tensors is not installed; `make test` installs it")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    source, tokens = _checkpoint(tmp_path / "q", method, bits, **options)
    out = export_compressed_tensors(source, tmp_path / "ct", log=lambda _: None)
    ours, _ = quipkit.load(source)
    # asymmetric grids: transformers' compressed load (with compressed-tensors 0.20) sizes the zero points
    # unpacked and drops the packed ones its own compressor writes; its dequantizing load reads them
    extra = {} if options.get("symmetric") else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        expected, got = ours(tokens[:2]).logits, theirs(tokens[:2]).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_methods_the_format_cannot_express_are_refused_with_what_it_takes(tmp_path):
    source, _ = _checkpoint(tmp_path / "q", "quip#", 2)
    with pytest.raises(QuipkitError, match="it takes rtn and gptq"):
        export_compressed_tensors(source, tmp_path / "ct")
    source, _ = _checkpoint(tmp_path / "q3", "gptq", 3, group_size=32)
    with pytest.raises(QuipkitError, match="--bits 4 or 8"):
        export_compressed_tensors(source, tmp_path / "ct")
