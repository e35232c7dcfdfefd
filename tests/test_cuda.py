"""The GPU paths: quantizing on CUDA and running quantized layers there (needs a CUDA machine).

CI has no GPU, so these run where one is lent (`pytest tests/test_cuda.py` on that machine); every
other test covers the same code on the CPU.
"""

import pytest
import torch

from quipkit.codebooks.trellis import code_values, trellis_encode, viterbi_torch
from quipkit.config import CalibrationConfig, make_config
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CAL = CalibrationConfig(nsamples=16, seqlen=32, batch_size=4)
CASES = [("rtn", 4, {}), ("gptq", 4, {}), ("quip#", 2, {}), ("quip#", 4, {}), ("qtip", 2, {"L": 10}),
         ("quip", 2, {}), ("gptq", 3, {"incoherence": True})]


def _tokens(n=16, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_torch_viterbi_on_gpu_matches_the_cpu():
    table = code_values("1mad", 12)
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(1))
    _, cost_gpu = trellis_encode(x.cuda(), table.cuda(), 12, 2, memory=1 << 26)  # several chunks
    _, cost_cpu = viterbi_torch(x, table, 12, 2)
    assert torch.allclose(cost_gpu.cpu(), cost_cpu, rtol=1e-4)


@pytest.mark.parametrize("method,bits,options", CASES)
def test_quantizing_on_gpu_matches_the_cpu(method, bits, options):
    """Same config and seed on both devices: logits as close to float as the CPU's; GPU forward = CPU forward."""
    reference = tiny_model()
    tokens = _tokens(seed=1)[:2]
    logits = {}
    for device in ("cpu", "cuda"):
        model = tiny_model()
        quantize_blockwise(model, _tokens(), make_config(method, bits, **options), CAL, torch.device(device))
        with torch.no_grad():
            logits[device] = model(tokens).logits
            on_gpu = model.cuda()(tokens.cuda()).logits.cpu()
        assert torch.allclose(on_gpu, logits[device], rtol=1e-3, atol=1e-3)
    ref = reference(tokens).logits.detach()
    err = {d: ((out - ref).norm() / ref.norm()).item() for d, out in logits.items()}
    assert err["cuda"] < 1.25 * err["cpu"] + 1e-3, err
