"""Layout mapping, descriptor creation and derivation, ownership and the plan cache, against the
real libcudnn (host-side calls only, no GPU needed)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from conftest import LAYOUTS, MODES, shape_for
from cudnn_bn import Mode
from cudnn_bn._core.layout import cudnn_dims_and_strides, make_layout
from cudnn_bn._cudnn import plans
from cudnn_bn._cudnn.descriptors import ActivationDescriptor, TensorDescriptor, cudnn_data_type, descriptors_created
from cudnn_bn._cudnn.errors import CudnnLimitError
from cudnn_bn._cudnn.raw import ActivationMode, DataType


def _c_strides(shape):
    return tuple(int(s) // 8 for s in np.empty(shape, np.float64).strides)


@pytest.mark.parametrize(
    "shape,axis,dims,strides",
    [
        ((8, 3), 1, (8, 3, 1, 1), (3, 1, 1, 1)),
        ((8, 3), -1, (8, 3, 1, 1), (3, 1, 1, 1)),
        ((8, 3, 5), 1, (8, 3, 5, 1), (15, 5, 1, 1)),
        ((8, 5, 3), -1, (8, 3, 5, 1), (15, 1, 3, 3)),
        ((8, 3, 4, 5), 1, (8, 3, 4, 5), (60, 20, 5, 1)),
        ((8, 4, 5, 3), -1, (8, 3, 4, 5), (60, 1, 15, 3)),
        ((2, 3, 4, 5, 6), 1, (2, 3, 4, 5, 6), (360, 120, 30, 6, 1)),
        ((2, 4, 5, 6, 3), -1, (2, 3, 4, 5, 6), (360, 1, 90, 18, 3)),
    ],
)
def test_layout_maps_to_nchw_dims_with_packed_strides(shape, axis, dims, strides):
    layout = make_layout(shape, axis, Mode.SPATIAL)
    assert cudnn_dims_and_strides(layout, _c_strides(shape)) == (dims, strides)


def test_layout_keeps_arbitrary_strides():
    layout = make_layout((4, 3, 6, 6), 1, Mode.SPATIAL)
    assert cudnn_dims_and_strides(layout, (216, 1, 36, 6)) == ((4, 3, 6, 6), (216, 1, 36, 6))


# cudnnDataType_t values from cudnn_graph.h, written out: the map under test must not build its
# own expectation
CUDNN_DATA_FLOAT, CUDNN_DATA_DOUBLE, CUDNN_DATA_HALF, CUDNN_DATA_BFLOAT16 = 0, 1, 2, 9


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("ndim,channel_axis", LAYOUTS)
@pytest.mark.parametrize("dtype,data_type",
                         [("float16", CUDNN_DATA_HALF), ("float32", CUDNN_DATA_FLOAT), ("float64", CUDNN_DATA_DOUBLE)])
def test_plan_descriptors_for_every_mode_layout_and_dtype(cudnn_library, mode, ndim, channel_axis, dtype, data_type):
    shape = shape_for(ndim, channel_axis, batch=3, channels=4)
    layout = make_layout(shape, channel_axis, mode)
    strides = _c_strides(shape)
    plan = plans.plan_for(plans.TRAINING, layout, np.dtype(dtype), 0)
    expected_dims, expected_strides = cudnn_dims_and_strides(layout, strides)
    assert plan.data_desc.describe() == (data_type, expected_dims, expected_strides)
    param_type, param_dims, _ = plan.param_desc.describe()
    assert param_type == (CUDNN_DATA_DOUBLE if dtype == "float64" else CUDNN_DATA_FLOAT)  # FLOAT for half data
    assert plan.cudnn_mode == {Mode.PER_ACTIVATION: 0, Mode.SPATIAL: 1, Mode.SPATIAL_PERSISTENT: 2}[mode]
    if mode.is_spatial:
        assert param_dims == (1, 4) + (1,) * (len(expected_dims) - 2)
    else:
        assert param_dims == (1,) + expected_dims[1:]
        # the parameters' element count is what the reference's parameter shape holds
        assert int(np.prod(param_dims)) == int(np.prod(layout.param_shape))


def test_the_dtype_map_matches_cudnns_enum_values():
    assert int(cudnn_data_type(np.float16)) == CUDNN_DATA_HALF
    assert int(cudnn_data_type(np.float32)) == CUDNN_DATA_FLOAT
    assert int(cudnn_data_type(np.float64)) == CUDNN_DATA_DOUBLE
    assert int(cudnn_data_type("bfloat16")) == CUDNN_DATA_BFLOAT16
    with pytest.raises(TypeError, match="dtype: expected one of"):
        cudnn_data_type(np.int32)


def test_every_descriptor_made_is_counted(cudnn_library):
    before = descriptors_created()
    made = [TensorDescriptor.from_dims(cudnn_data_type(np.float32), (2, 3, 4, 5), (60, 20, 5, 1)) for _ in range(3)]
    made.append(ActivationDescriptor.of(1))
    assert descriptors_created() == before + 4
    for descriptor in made:
        descriptor.close()
    assert descriptors_created() == before + 4  # a count of creations: closing leaves it


def test_plans_do_not_grow_over_repeated_calls(cudnn_library):
    layout = make_layout((16, 8, 5, 5), 1, Mode.SPATIAL)
    first = plans.plan_for(plans.TRAINING, layout, np.dtype(np.float32), 0)
    created, plans_created = descriptors_created(), plans.PLANS.created
    for _ in range(10_000):
        again = plans.plan_for(plans.TRAINING, make_layout((16, 8, 5, 5), 1, Mode.SPATIAL), np.dtype(np.float32), 0)
    assert again is first
    assert descriptors_created() == created and plans.PLANS.created == plans_created


def test_the_plan_cache_is_bounded_and_evicted_plans_keep_their_descriptors(cudnn_library):
    cache = plans.PlanCache(capacity=3)
    build = lambda n: lambda: plans.Plan(  # noqa: E731
        plans.TRAINING, make_layout((n, 2, 3), 1, Mode.SPATIAL), np.dtype(np.float32), 0
    )
    held = cache.get("a", build(2))
    for key, n in zip("bcde", range(3, 7)):
        cache.get(key, build(n))
    assert len(cache) == 3 and cache.created == 5
    gc.collect()
    assert not held.data_desc.closed and held.data_desc.describe()[1] == (2, 2, 3, 1)


def test_descriptor_ownership(cudnn_library):
    descriptor = TensorDescriptor.from_dims(DataType.FLOAT, (2, 3, 4, 5), (60, 20, 5, 1))
    descriptor.close()
    descriptor.close()  # idempotent
    assert descriptor.closed
    with pytest.raises(ValueError, match="closed"):
        descriptor.pointer
    with TensorDescriptor.from_dims(DataType.HALF, (2, 3, 4, 5), (60, 1, 15, 3)) as inside:
        assert inside.describe()[0] is DataType.HALF
    assert inside.closed
    finalizer = TensorDescriptor.from_dims(DataType.FLOAT, (2, 3, 4, 5), (60, 20, 5, 1))._finalizer
    gc.collect()
    assert not finalizer.alive  # collected object released its descriptor


def test_activation_descriptor(cudnn_library):
    with ActivationDescriptor.of(ActivationMode.RELU) as activation:
        assert activation.pointer
    assert activation.closed


@pytest.mark.parametrize("dims,strides",
                         [((2, 3, 4), (12, 4, 1)), ((2, 0, 4, 5), (20, 20, 5, 1)), ((2, 3, 4, 5), (60, 20, 5, -1))])
def test_bad_dims_are_refused_before_the_native_call(cudnn_library, dims, strides):
    with pytest.raises(ValueError, match="dims, strides"):
        TensorDescriptor.from_dims(DataType.FLOAT, dims, strides)


def test_six_dims_are_refused(cudnn_library):
    with pytest.raises(ValueError):
        TensorDescriptor.from_dims(DataType.FLOAT, (1, 2, 1, 1, 1, 1), (2, 1, 1, 1, 1, 1))


def test_a_dim_past_int32_is_refused_naming_dims_and_strides(cudnn_library):
    with pytest.raises(CudnnLimitError,
                       match=r"^dims, strides: cuDNN takes dims, strides and element counts as 32-bit ints"):
        TensorDescriptor.from_dims(DataType.FLOAT, (1, 2**31, 1, 1), (2**31, 1, 1, 1))


@pytest.mark.parametrize(
    "shape,axis,expected",
    [((8, 3, 4, 5), 1, (8, 3, 4, 5)), ((8, 3, 4, 5), -1, (8, 4, 5, 3)), ((8, 3), -1, (8, 3)),
     ((2, 3, 4, 5, 6), -1, (2, 4, 5, 6, 3))],
)
def test_physical_shape_moves_channels_last(shape, axis, expected):
    from cudnn_bn._core.layout import physical_shape

    assert physical_shape(shape, axis) == expected
