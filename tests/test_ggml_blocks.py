"""llama.cpp's block formats as codebooks: byte-exact against the gguf package's reference
(de)quantizers, and rounded through the Hessian by the gguf-* presets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import quipkit
from quipkit.codebooks import make_codebook
from quipkit.config import make_config
from quipkit.errors import QuipkitError
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model
from test_pipeline import CAL, _tokens

TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1,
         "q8_0": GGMLQuantizationType.Q8_0, "iq4_nl": GGMLQuantizationType.IQ4_NL, "q4_k": GGMLQuantizationType.Q4_K,
         "q3_k": GGMLQuantizationType.Q3_K, "q2_k": GGMLQuantizationType.Q2_K}
K_QUANTS = ("q4_k", "q3_k", "q2_k")


def _codebook(block_type, clip=True):
    return make_codebook({"name": "ggml_k" if block_type in K_QUANTS else "ggml", "type": block_type, "clip": clip})


def _weights(rows=24, cols=160, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3, 5], w[7, 40], w[9, 64:96] = 0.9, -1.2, 0.0  # outliers of both signs and an all-zero block
    return w


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("block_type", list(TYPES))
def test_stored_blocks_are_llama_cpp_bytes(block_type, clip):
    """llama.cpp's own dequantizer (the gguf package's) reads our bytes as the values we round to."""
    cb = _codebook(block_type, clip)
    w = _weights(cols=512 if block_type in K_QUANTS else 160)
    if block_type in K_QUANTS:
        w[10, 256:] = 0.0  # an all-zero superblock
        w[11, :256] = w[11, :256].abs() + 0.01  # a superblock whose minima are all 0
    params = cb.fit(w)
    codes, values = cb.quantize(w, params, torch.arange(w.shape[1]))
    stored = cb.pack(codes, params)
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == cb.storage(*w.shape)
    theirs = quants.dequantize(stored["blocks"].numpy(), TYPES[block_type])
    assert np.array_equal(theirs, values.numpy())
    assert torch.equal(cb.decode(codes, params), values)
    codes_back, params_back = cb.unpack(stored, *w.shape)
    assert torch.equal(codes_back, codes) and all(torch.equal(params_back[k], params[k]) for k in params)
    assert torch.equal(values[9, 64:96], torch.zeros(32))


@pytest.mark.parametrize("block_type", ["q4_0", "q4_1", "q8_0"])
def test_round_to_nearest_is_llama_cpps_quantizer_or_closer(block_type):
    """Without clipping: llama.cpp's scale formula and the nearest level. llama.cpp picks codes with the
    float32 scale but stores the fp16 one, so a few of its weights land one level off; ours never do."""
    cb = make_codebook({"name": "ggml", "type": block_type, "clip": False})
    w = _weights(seed=1)
    params = cb.fit(w)
    codes, values = cb.quantize(w, params, torch.arange(w.shape[1]))
    reference = quants.quantize(w.numpy(), TYPES[block_type])
    theirs = torch.from_numpy(quants.dequantize(reference, TYPES[block_type]))
    assert (values == theirs).float().mean() > 0.97
    assert ((values - w).abs() <= (theirs - w).abs() + 1e-7).all()
    clipped = make_codebook({"name": "ggml", "type": block_type, "clip": True})
    p = clipped.fit(w)
    assert (clipped.quantize(w, p, torch.arange(w.shape[1]))[1] - w).square().sum() <= (values - w).square().sum()


@pytest.mark.parametrize("block_type", ["q4_0", "iq4_nl", "q4_1"])
def test_the_scale_search_spends_precision_where_the_importance_is(block_type):
    w = _weights(rows=64, cols=256, seed=1)
    importance = torch.ones(256)
    importance[5::32] = 1000.0  # one column of every block costs a thousand times more
    codebook = make_codebook({"name": "ggml", "type": block_type})
    cols = torch.arange(256)
    plain = codebook.quantize(w, codebook.fit(w), cols)[1] - w
    weighted = codebook.quantize(w, codebook.fit(w, importance), cols)[1] - w
    assert weighted[:, 5::32].abs().mean() < 0.5 * plain[:, 5::32].abs().mean()
    assert (importance * weighted.square()).sum() < (importance * plain.square()).sum()


def test_k_quants_cost_what_llama_cpp_says_and_q4_k_fits_as_well_as_q4_1():
    """Q4_K's 6-bit block scales cost little over Q4_1's fp16 ones (4.5 bits per weight against 5); each
    k-quant's error grows as its bits fall; rows not in 256s get IQ4_NL."""
    w = _weights(rows=64, cols=512, seed=2)
    cols = torch.arange(512)
    errors = {}
    for block_type in ("q4_1", *K_QUANTS):
        cb = _codebook(block_type)
        errors[block_type] = (cb.quantize(w, cb.fit(w), cols)[1] - w).square().sum()
    assert errors["q4_k"] < 1.1 * errors["q4_1"]
    assert errors["q4_k"] < errors["q3_k"] < errors["q2_k"] < w.square().sum() / 5
    for block_type, superblock_bytes in zip(K_QUANTS, (144, 110, 84)):  # 4.5, 3.4375, 2.625 bits per weight
        cb = _codebook(block_type)
        assert cb.storage(64, 512)["blocks"][0] == (64, 2 * superblock_bytes)
        assert cb.for_columns(512) is cb and cb.for_columns(576).spec() == {"name": "ggml", "type": "iq4_nl", "clip": True}


def test_a_row_not_in_blocks_of_32_is_refused_in_one_line():
    with pytest.raises(QuipkitError, match="Q4_0 needs in_features divisible by 32"):
        make_codebook({"name": "ggml", "type": "q4_0"}).check_shape(64, 48)
    with pytest.raises(QuipkitError, match="Q4_K needs in_features divisible by 256"):
        _codebook("q4_k").check_shape(64, 576)
    with pytest.raises(QuipkitError, match="unknown llama.cpp block type 'q5_k'"):
        make_codebook({"name": "ggml", "type": "q5_k"})


@pytest.mark.parametrize("method", ["gguf-q4_0", "gguf-iq4_nl", "gguf-q4_k", "gguf-q2_k"])
def test_gguf_presets_round_through_the_hessian_better_than_nearest_and_load_back(tmp_path, method):
    tokens = _tokens()
    shape = {"intermediate_size": 256}  # down_proj's rows in 256s (Q4_K), the other layers' not (IQ4_NL)
    rounded = tiny_model(**shape)
    config = make_config(method, 2 if method == "gguf-q2_k" else 4)
    report = quantize_blockwise(rounded, tokens, config, CAL, torch.device("cpu"))
    if method.endswith("_k"):
        kinds = {name: m.codebook.spec()["type"] for name, m in rounded.named_modules()
                 if ".layers." in name and hasattr(m, "codebook")}
        assert {kind for name, kind in kinds.items() if name.endswith("down_proj")} == {method[5:]}
        assert {kind for name, kind in kinds.items() if not name.endswith("down_proj")} == {"iq4_nl"}
    nearest = tiny_model(**shape)
    nearest_config = dataclasses.replace(config, rounding="nearest", act_order=False)
    nearest_report = quantize_blockwise(nearest, tokens, nearest_config, CAL, torch.device("cpu"))
    ldlq = sum(r["proxy"] for r in report.layers)
    rtn = sum(r["proxy"] for r in nearest_report.layers)
    assert ldlq < 0.8 * rtn
    bits = {r["name"].rpartition(".")[2]: r["bits"] for r in report.layers}
    # as llama.cpp stores them: 18 bytes per 32 weights (IQ4_NL, Q4_0), 144 per 256 (Q4_K), 84 (Q2_K)
    assert bits == {**dict.fromkeys(bits, 4.5), **({"down_proj": 2.625} if method == "gguf-q2_k" else {})}
    out = quipkit.save(rounded, None, tmp_path / "q", config, CAL, {"layers": report.layers})
    loaded, _ = quipkit.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(tokens[:2]).logits, rounded(tokens[:2]).logits)



@pytest.mark.parametrize("block_type", ["q4_0", "q4_1", "iq4_nl"])
def test_block_scales_refit_through_the_hessian_reach_the_least_squares_optimum(block_type):
    """After rounding, each row's block scales (and minima) are re-solved for its codes through H: the
    loss (w - v) H (w - v)^T lands on the optimum a dense least-squares solve over every block's basis
    finds (up to fp16 storage), never above the loss before, and the result packs and unpacks exactly."""
    from quipkit.rounding.ldlq import ldlq

    gen = torch.Generator().manual_seed(4)
    rows, cols = 6, 96
    x = torch.randn(8 * cols, cols, generator=gen) * torch.linspace(0.3, 2.0, cols)
    x[:, :20] += torch.randn(8 * cols, 1, generator=gen)  # correlated columns: the blocks interact through H
    h = x.t() @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=gen) * 0.05
    cb = _codebook(block_type)
    params = cb.fit(w, torch.diagonal(h))
    codes, values = ldlq(w, h, cb, params, None)
    refit = cb.refit(codes, params, w, h)

    def loss(v):
        return ((w - v) @ h.double() * (w - v)).sum(1)

    before, after = loss(values.double()), loss(cb.decode(codes, refit).double())
    assert (after <= before).all() and after.sum() < 0.99 * before.sum()
    levels = cb._levels[codes.long()].double()
    chol = torch.linalg.cholesky(h.double())
    for row in range(rows):
        basis = []  # the values are basis @ parameters: one column per block's scale (and minimum)
        for block in range(cols // 32):
            inside = torch.zeros(cols, dtype=torch.float64)
            inside[block * 32:(block + 1) * 32] = 1.0
            basis.append(inside * levels[row])
            if block_type == "q4_1":
                basis.append(inside)
        basis = torch.stack(basis, 1)
        best = torch.linalg.lstsq(chol.t() @ basis, chol.t() @ w[row].double()).solution
        assert after[row] <= loss((basis @ best).float().double()[None])[0] * 1.001 + 1e-9
    stored = cb.pack(codes, refit)
    back_codes, back = cb.unpack(stored, rows, cols)
    assert torch.equal(back_codes, codes) and all(torch.equal(back[k], refit[k]) for k in refit)
