"""The CUDA launch code at its limits, on the CPU emulator: split-K per device, grid limits, bad
slot ids and indices, the layer entry point, the real 4096x11008 shape (`slow`), and the count
of kernel entry points the emulated tests launched.

Split-K results are bitwise equal under every block/thread schedule for one device (SM count)
and equal within tolerance across devices, whose plans differ: "deterministic per device".
Skipped, saying why, where `../shared/cuemu` or g++ is absent.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_cuda_cases import NUM_SLOTS, assert_close, exact, make_layer, make_slots, make_x
from test_cuda_emulator import CUEMU_MISSING, LAUNCHED

from owq.kernels import cuda_ops, reference
from owq.kernels.cuda_build import DeviceLimits

if CUEMU_MISSING:
    pytest.skip(CUEMU_MISSING, allow_module_level=True)

from test_cuda_emulator import (  # noqa: E402
    SCHEDULES,
    EmulatedBackend,
    check,
    emulator_session,
    kernel_names,
    run,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_built_modules():
    yield from emulator_session()


def splits_used(op, layer, x, slots, limits, schedule) -> tuple[torch.Tensor, set[int]]:
    with EmulatedBackend(schedule=schedule, limits=limits) as b, cuda_ops.use_backend(b):
        y = getattr(cuda_ops, op)(b.guard(x, "x"), layer.packed, layer.weak, layer.bias, slots)
        assert b.tickets_left() == [0] * len(b.ticket_counters())
        return y.clone(), {grid[1] for name, grid, _ in b.launches if "gemv" in name}


# split-K: deterministic per device ----------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("shape", [(1536, 576), (4096, 256), (1024, 2048)], ids=str)
def test_split_k_is_bitwise_deterministic_per_device(shape, m):
    layer = make_layer(*shape, 3, 128, 8, True)
    x, slots = make_x(m, shape[0], seed=m), make_slots("random", m, NUM_SLOTS, seed=m)
    schedules = SCHEDULES if m == 3 else SCHEDULES[:2]
    plans = set()
    for sms in (1, 8, 132):
        limits = DeviceLimits(sms, 65536, 228 * 1024)
        outs = []
        for schedule in schedules:
            y, splits = splits_used("dequant_gemv", layer, x, slots, limits, schedule)
            outs.append(y)
        plans.add(frozenset(splits))
        assert all(torch.equal(y, outs[0]) for y in outs), f"{sms} SMs: not bitwise equal"
        assert_close(outs[0], exact(x, layer, slots), shape[0])
    assert len(plans) > 1, "every SM count gave the same split-K plan"


# grid limits: launches are cut, never over the device's y / z limit ---------------------------
@pytest.mark.parametrize("op,m", [("dequant_gemv", 40), ("dequant_gemv", 17), ("owq_matmul", 40)])
def test_launches_stay_within_grid_limits(op, m):
    limits = DeviceLimits(132, 65536, 228 * 1024, max_grid_y=2, max_grid_z=2)
    layer = make_layer(256, 260, 3, 32, 8, True)
    x, slots = make_x(m, 256, seed=m), make_slots("random", m, NUM_SLOTS, seed=m)
    with EmulatedBackend(limits=limits) as b, cuda_ops.use_backend(b):
        y = getattr(cuda_ops, op)(b.guard(x, "x"), layer.packed, layer.weak, layer.bias, slots)
        grids = [grid for _, grid, _ in b.launches]
    assert_close(y, exact(x, layer, slots), 256)
    assert all(g[1] <= 2 and g[2] <= 2 for g in grids), grids
    assert len(grids) > 1 + (op == "owq_matmul")  # cut into several launches


@pytest.mark.parametrize(
    "op,m,kernel",
    [("owq_matmul", 524_281, "weak_columns_sgmv"), ("dequant_gemv", 524_289, "dequant")],
)
def test_launch_shapes_past_524280_rows(op, m, kernel):
    """B1: the SGMV's grid.y was ceil(M/8) and the GEMV's grid.z its row chunks, both > 65,535
    here; every launch is checked (not run: 65,536 blocks take half a minute on the emulator)."""
    layer = make_layer(32, 4, 4, -1, 1, True)
    x, slots = make_x(m, 32, seed=3), make_slots("random", m, NUM_SLOTS, seed=3)
    with EmulatedBackend(execute=False) as b, cuda_ops.use_backend(b):
        getattr(cuda_ops, op)(b.guard(x, "x"), layer.packed, layer.weak, layer.bias, slots)
    assert len([name for name, *_ in b.launches if name.startswith(kernel)]) == 2, b.launches


# bad slot ids and indices: NaN rows in the kernels, ValueError where they are set ------------
@pytest.mark.parametrize("op,m", [("dequant_gemv", 5), ("owq_matmul", 40)])
def test_slot_out_of_range_makes_its_row_nan(op, m):
    layer = make_layer(256, 260, 3, 32, 8, True)
    x, slots = make_x(m, 256, seed=1), make_slots("random", m, NUM_SLOTS, seed=1)
    slots[1], slots[3] = -1, NUM_SLOTS + 1
    y = run(op, layer, x, slots)
    good = [r for r in range(m) if r not in (1, 3)]
    assert bool(y[[1, 3]].isnan().all()) and not bool(y[good].isnan().any())
    assert_close(y[good], exact(x[good], layer, slots[good]), 256)
    with pytest.raises(ValueError, match=r"\[0, 16\], got \[-1, 17\]"):
        layer.weak.check_slots(slots)
    with pytest.raises(IndexError):  # the twin refuses too
        reference.owq_matmul(x.float(), layer.packed, layer.weak, None, slots)


@pytest.mark.parametrize("op,m", [("dequant_gemv", 3), ("owq_matmul", 40)])
def test_weak_index_outside_x_gives_nan_not_a_read_past_it(op, m):
    layer = copy.deepcopy(make_layer(256, 260, 3, 32, 8, True))
    layer.outlier_idx[-1] = 256  # one past the last input: x is guarded, a read would fault
    y = run(op, layer, make_x(m, 256, seed=2), make_slots("random", m, NUM_SLOTS, seed=2))
    assert bool(y.isnan().all())
    with pytest.raises(ValueError, match=r"\[0, 256\), got"):
        layer.weak.check_indices(256)
    layer.outlier_idx[-1] = layer.outlier_idx[0]
    with pytest.raises(ValueError, match="sorted and unique"):
        layer.weak.check_indices(256)


# the layer entry point ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch,seq", [(1, 1), (4, 1), (3, 7), (2, 40)])
def test_linear_forward_matches_twin(batch, seq, dtype):
    """x [B, T, in] with host slots [B]; bf16 and fp32 inputs past float16's range stay finite."""
    layer = make_layer(576, 1536, 3, 64, 8, True)
    x = torch.randn(batch, seq, 576, generator=torch.Generator().manual_seed(seq)).to(dtype)
    x[..., 5] = 6.0e4 if dtype == torch.float16 else 9.0e4
    slots = (torch.arange(batch) % (NUM_SLOTS + 1)).to(torch.int32)
    with EmulatedBackend() as b, cuda_ops.use_backend(b):
        y = cuda_ops.linear_forward(x, layer.packed, layer.weak, layer.bias, slots)
    expected = reference.owq_matmul(x.float(), layer.packed, layer.weak, layer.bias, slots)
    assert y.shape == (batch, seq, 1536) and y.dtype == dtype
    assert bool(torch.isfinite(y).all())
    assert_close(y, expected, 576, dtype)


def test_linear_forward_refuses_host_slots_out_of_range():
    layer = make_layer(128, 256, 4, -1, 8, True)
    with EmulatedBackend() as b, cuda_ops.use_backend(b), pytest.raises(ValueError, match="17"):
        cuda_ops.linear_forward(
            make_x(2, 128), layer.packed, layer.weak, None, torch.tensor([0, 17])
        )


def test_bad_arguments_raise_value_error_with_sizes():
    layer = make_layer(64, 40, 3, -1, 2)
    x = make_x(2, 64)
    with EmulatedBackend() as b, cuda_ops.use_backend(b):
        with pytest.raises(ValueError, match="float16 or bfloat16"):
            cuda_ops.owq_matmul(x.float(), layer.packed, layer.weak)
        short = type(layer.packed)(layer.qweight[:-1], layer.scales, layer.qzeros, 3, -1)
        with pytest.raises(ValueError, match=r"\[6, 40\]"):
            cuda_ops.owq_matmul(x, short, layer.weak)
        narrow = type(layer.weak)(layer.outlier_idx, layer.weak_table[:, :, :-1].contiguous())
        with pytest.raises(ValueError, match=r"\[17, 2, 40\]"):
            cuda_ops.owq_matmul(x, layer.packed, narrow)
        with pytest.raises(ValueError, match=r"slots must be an integer tensor \[2\]"):
            cuda_ops.dequant_gemv(
                x, layer.packed, layer.weak, None, torch.zeros(3, dtype=torch.int64)
            )
    with pytest.raises(ValueError, match="CUDA"):
        cuda_ops.owq_matmul(x, layer.packed, layer.weak)  # the default backend wants CUDA tensors


# the real shape (slow on the emulator) --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bits,m", [(3, 1), (3, 8), (4, 1)])
def test_gemv_4096x11008(bits, m):
    check("dequant_gemv", make_layer(4096, 11008, bits, 128, 8, True), m, mix="random")


# every entry point ----------------------------------------------------------------------------
def test_every_kernel_entry_point_was_launched(request):
    """The emulated tests reached every kernel the sources define, for both activation types."""
    names = {item.name.split("[")[0] for item in request.session.items}
    if "test_gemv_matches_twin" not in names:
        pytest.skip(
            "counts the launches of tests/test_cuda_emulated.py: run it in the same session"
        )
    acts = (("f16", torch.float16), ("bf16", torch.bfloat16))
    defined = {(act, name) for act, dtype in acts for name in kernel_names(dtype)}
    missing = sorted(defined - LAUNCHED)
    assert not missing, f"never launched: {missing}"
