"""ICQuant's index code: exact round trips, escapes, and its size against the entropy floor."""

import pytest
import torch

from quipkit.codebooks import outlier_positions as op


def _round_trip(mask: torch.Tensor, width: int) -> torch.Tensor:
    stream, counts = op.encode(mask, width)
    assert torch.equal(counts, mask.sum(1, dtype=torch.int32))
    assert stream.numel() == (op.symbol_count(op.gaps(mask), width) * width + 7) // 8
    return op.decode(stream, counts, width, mask.shape[1])


def test_masks_round_trip_exactly_at_every_width():
    gen = torch.Generator().manual_seed(0)
    cols = 300
    mask = torch.rand(40, cols, generator=gen) < 0.05
    mask[3] = False  # a row with no outliers
    mask[4] = True  # an all-outlier row
    mask[5] = False
    mask[5, cols - 1] = True  # one outlier after a gap longer than any width's escape below 9 bits
    mask[6] = False
    mask[6, 0] = True  # an outlier in the first column: gap 0
    mask[-1] = False  # the last row empty
    for width in op.WIDTHS:
        assert torch.equal(_round_trip(mask, width), mask), width


def test_escapes_code_long_gaps_and_an_empty_matrix_codes_to_nothing():
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, 70] = mask[1, 7] = mask[1, 99] = True
    stream, counts = op.encode(mask, 3)  # escape 7: gap 70 is ten escapes and a 0; 7 is an escape and a 0
    symbols = op.unpack_bits(stream, 3, op.symbol_count(op.gaps(mask), 3)).tolist()
    assert symbols == [7] * 10 + [0] + [7, 0] + [7] * 13 + [0]
    assert torch.equal(op.decode(stream, counts, 3, 100), mask)
    empty = torch.zeros(3, 50, dtype=torch.bool)
    stream, counts = op.encode(empty, 5)
    assert stream.numel() == 0 and torch.equal(op.decode(stream, counts, 5, 50), empty)


def test_each_row_starts_where_the_rows_before_it_end():
    gen = torch.Generator().manual_seed(1)
    score = torch.rand(30, 200, generator=gen)
    score[:, 150:] *= 0.01  # no outliers in the last columns: a row's code ends before them
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(6, dim=1).indices, True)
    for width in (2, 4, 7):
        stream, _ = op.encode(mask, width)
        starts = op.row_starts(stream, 6, 30, width)
        # brute force: a row's code is the whole matrix's code of the rows before it, then its own
        expected = [op.symbol_count(op.gaps(mask[:r]), width) for r in range(30)]
        assert starts.tolist() == expected, width
    assert op.row_starts(torch.zeros(0, dtype=torch.uint8), 0, 4, 3).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("ratio", [0.02, 0.05, 0.08])
def test_the_best_width_comes_near_the_entropy_floor(ratio):
    gen = torch.Generator().manual_seed(1)
    rows, cols = 64, 4096
    scores = torch.rand(rows, cols, generator=gen)
    k = round(ratio * cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    width = op.best_width(mask)
    costs = {w: w * op.symbol_count(op.gaps(mask), w) for w in op.WIDTHS}
    assert costs[width] == min(costs.values())
    bits = costs[width] / (rows * cols)
    print(f"ratio {ratio}: width {width}, {bits:.4f} bits per weight, entropy floor {op.entropy_bits(ratio):.4f}")
    floor = op.entropy_bits(ratio)
    assert floor < bits < 1.15 * floor  # random positions: within 15% of h(ratio)
    assert torch.equal(op.decode(*op.encode(mask, width), width, cols), mask)
