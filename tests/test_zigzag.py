import pytest
import torch

from m4v.ops.zigzag import NUM_DIRECTIONS, inverse_orders, raster_order, zigzag_orders

SHAPES = [(1, 1), (1, 7), (7, 1), (2, 2), (3, 5), (5, 3), (4, 4), (48, 80)]


def _cells(order, w):
    return [(int(i) // w, int(i) % w) for i in order]


@pytest.mark.parametrize("h,w", SHAPES)
def test_each_order_is_a_path_of_4_neighbours(h, w):
    orders = zigzag_orders(h, w)
    assert orders.shape == (NUM_DIRECTIONS, h * w) and orders.dtype == torch.long
    for order in orders:
        assert sorted(order.tolist()) == list(range(h * w))
        cells = _cells(order, w)
        for (r0, c0), (r1, c1) in zip(cells[:-1], cells[1:], strict=True):
            assert abs(r0 - r1) + abs(c0 - c1) == 1


@pytest.mark.parametrize("h,w", SHAPES)
def test_starts_in_the_documented_corner_and_sweeps_the_documented_axis(h, w):
    orders = zigzag_orders(h, w)
    corners = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)]
    for k in range(NUM_DIRECTIONS):
        cells = _cells(orders[k], w)
        assert cells[0] == corners[k // 2]
        if k % 2 == 0:  # row-wise: the first row is finished before the path changes row
            assert {r for r, _ in cells[:w]} == {cells[0][0]}
        else:  # column-wise: the first column comes first
            assert {c for _, c in cells[:h]} == {cells[0][1]}


def test_direction_0_is_the_row_wise_boustrophedon_from_the_top_left():
    expected = [0, 1, 2, 5, 4, 3]  # 2 x 3 grid: row 0 left to right, row 1 right to left
    assert zigzag_orders(2, 3)[0].tolist() == expected
    assert zigzag_orders(2, 3)[1].tolist() == [0, 3, 4, 1, 2, 5]


@pytest.mark.parametrize("h,w", [(2, 2), (3, 5), (4, 4), (48, 80)])
def test_eight_distinct_orders_when_both_sides_at_least_2(h, w):
    assert len({tuple(o.tolist()) for o in zigzag_orders(h, w)}) == 8


@pytest.mark.parametrize("h,w,distinct", [(1, 7, 2), (7, 1, 2), (1, 1, 1)])
def test_one_wide_grids_have_fewer_distinct_orders(h, w, distinct):
    assert len({tuple(o.tolist()) for o in zigzag_orders(h, w)}) == distinct


@pytest.mark.parametrize("h,w", SHAPES)
def test_inverses_are_exact(h, w):
    orders, inverse = zigzag_orders(h, w), inverse_orders(h, w)
    ident = torch.arange(h * w)
    for k in range(NUM_DIRECTIONS):
        assert torch.equal(orders[k][inverse[k]], ident)
        assert torch.equal(inverse[k][orders[k]], ident)
    x = torch.randn(2, h * w, 3)
    for k in range(NUM_DIRECTIONS):
        assert torch.equal(x[:, orders[k]][:, inverse[k]], x)


def test_cached_per_grid_and_device():
    assert zigzag_orders(3, 5) is zigzag_orders(3, 5)
    assert inverse_orders(3, 5) is inverse_orders(3, 5, device="cpu")
    assert zigzag_orders(3, 5) is not zigzag_orders(5, 3)
    assert zigzag_orders(3, 5, device="meta").device.type == "meta"


def test_raster_order():
    assert raster_order(3, 4).tolist() == list(range(12))


@pytest.mark.parametrize("fn", [zigzag_orders, inverse_orders, raster_order])
@pytest.mark.parametrize("h,w", [(0, 3), (3, -1), (2.0, 3), (True, 3), ("4", 4)])
def test_bad_grid_raises_value_error(fn, h, w):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        fn(h, w)
