"""A quantized model in the transformers ecosystem: save_pretrained round trips, dtype and device_map
at load, casts that keep the stored formats, and LoRA adapters trained with PEFT on top (QLoRA)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

import quipkit
from quipkit.config import make_config
from quipkit.layers.quantized_embedding import QuantizedEmbedding
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model
from test_pipeline import CAL, _tokens

peft = pytest.importorskip("peft")  # the `peft` extra; `make test` installs it


def _checkpoint(folder, tied=False, method="quip#", bits=2, **options):
    model = tiny_model(tie_word_embeddings=tied)
    config = make_config(method, bits, **options)
    report = quantize_blockwise(model, _tokens(), config, CAL, torch.device("cpu"))
    return quipkit.save(model, None, folder, config, CAL, {"layers": report.layers})


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tied, shard", [(False, None), (True, None), (False, "30KB")],
                         ids=["one-file", "tied-head", "sharded"])
def test_save_pretrained_of_a_loaded_model_loads_again_with_identical_logits(tmp_path, tied, shard):
    out = _checkpoint(tmp_path / "q", tied=tied, head_bits=4)
    tokens = _tokens(seed=3)[:2]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = _logits(loaded, tokens)
    kwargs = {"max_shard_size": shard} if shard else {}
    loaded.save_pretrained(tmp_path / "saved", **kwargs)
    if shard:
        assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(_logits(again, tokens), expected)
    via_quipkit, _ = quipkit.load(tmp_path / "saved")
    assert torch.equal(_logits(via_quipkit, tokens), expected)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["layers"] == json.loads((out / "config.json").read_text())["quantization_config"]["layers"]


def test_push_to_hub_uploads_a_folder_that_loads_with_identical_logits(tmp_path, monkeypatch):
    """push_to_hub with the hub replaced by a local folder (no network here): what it uploads loads back."""
    import shutil
    from types import SimpleNamespace

    from transformers.utils import hub

    out = _checkpoint(tmp_path / "q")
    uploaded = tmp_path / "hub" / "me" / "tiny-2bit"
    monkeypatch.setattr(hub, "hf_api", lambda: SimpleNamespace(
        create_repo=lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id)))
    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda *args, **kwargs: SimpleNamespace(save=lambda path: None))
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files",
                        lambda self, folder, repo_id, **kwargs: shutil.copytree(folder, uploaded))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    loaded.push_to_hub("me/tiny-2bit")
    tokens = _tokens(seed=8)[:2]
    again = transformers.AutoModelForCausalLM.from_pretrained(uploaded).eval()
    assert torch.equal(_logits(again, tokens), _logits(loaded, tokens))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_lower_precision_load_computes_in_it_and_keeps_the_stored_formats(tmp_path, dtype):
    out = _checkpoint(tmp_path / "q", head_bits=4)
    tokens = _tokens(seed=4)[:2]
    full = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = _logits(full, tokens)
    low = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    hidden = {}
    low.model.layers[0].register_forward_hook(
        lambda module, args, output: hidden.update(dtype=(output[0] if isinstance(output, tuple) else output).dtype))
    got = _logits(low, tokens)
    assert hidden["dtype"] == dtype  # the residual stream runs in the asked dtype, from the embeddings on
    assert (got.float() - expected).abs().max() <= 0.05 * expected.abs().max()  # a few bf16 ulps of the logits
    q_full, q_low = full.model.layers[0].self_attn.q_proj, low.model.layers[0].self_attn.q_proj
    for name, tensor in q_full.named_buffers():
        assert torch.equal(getattr(q_low, name), tensor)  # codes, fp16 sign vectors: as stored


def test_a_cast_after_loading_keeps_every_stored_tensor_bit_for_bit(tmp_path):
    out = _checkpoint(tmp_path / "q", head_bits=4)
    model, _ = quipkit.load(out)
    stored = lambda: {f"{name}.{key}": tensor for name, module in model.named_modules()  # noqa: E731
                      if isinstance(module, (QuantizedLinear, QuantizedEmbedding))
                      for key, tensor in module.named_buffers(recurse=False) if tensor is not None}
    before = {name: tensor.clone() for name, tensor in stored().items()}
    assert any(t.dtype == torch.float16 for t in before.values())  # fp16 scales and signs: bf16 would lose bits
    model.to(torch.bfloat16)
    after = stored()
    assert all(torch.equal(after[name], tensor) and after[name].dtype == tensor.dtype for name, tensor in before.items())
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert _logits(model, _tokens(seed=5)[:1]).dtype == torch.bfloat16


def test_device_map_auto_and_disk_offload_give_the_same_logits(tmp_path):
    out = _checkpoint(tmp_path / "q")
    tokens = _tokens(seed=6)[:2]
    expected = _logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), tokens)
    auto = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="auto").eval()
    assert torch.equal(_logits(auto, tokens), expected)
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, device_map=placement, offload_folder=str(tmp_path / "offload")).eval()
    assert torch.equal(_logits(offloaded, tokens), expected)


def _dense_twin(model):
    """The same model with every QuantizedLinear replaced by an nn.Linear holding its effective weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.effective_weight()
            if module.bias is not None:
                dense.bias.data = module.bias.detach().float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense)
    return model


def test_lora_trains_on_a_quantized_model_with_the_gradients_of_its_dense_twin(tmp_path):
    out = _checkpoint(tmp_path / "q")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    tokens = _tokens(seed=7)[:4]
    quantized = transformers.AutoModelForCausalLM.from_pretrained(out)
    codes = {name: tensor.clone() for name, tensor in quantized.named_buffers() if tensor is not None}
    torch.manual_seed(0)
    model = peft.get_peft_model(quantized, peft.LoraConfig(**lora))
    twin_base = _dense_twin(transformers.AutoModelForCausalLM.from_pretrained(out))
    torch.manual_seed(0)  # the same adapters' initial weights
    twin = peft.get_peft_model(twin_base, peft.LoraConfig(**lora))
    adapters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    model(input_ids=tokens, labels=tokens).loss.backward()
    twin(input_ids=tokens, labels=tokens).loss.backward()
    twin_grads = {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}
    for name, parameter in adapters.items():  # layer 0's adapters get theirs through every quantized layer above
        assert torch.allclose(parameter.grad, twin_grads[name], rtol=1e-3, atol=1e-6), name

    optimizer = torch.optim.Adam(adapters.values(), lr=5e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3  # near ln(256) at the start: a random model
    assert all(torch.equal(tensor, codes[name.replace("base_model.model.", "").replace(".base_layer", "")])
               for name, tensor in model.named_buffers() if tensor is not None and not name.endswith("decoded"))

    expected = _logits(model.eval(), tokens)
    model.save_pretrained(tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(out)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(_logits(reloaded, tokens), expected)
    with pytest.raises(ValueError, match="cannot be merged into quipkit's quantized codes"):
        reloaded.merge_and_unload()
