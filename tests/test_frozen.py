"""cudnn_bn/_cudnn/frozen.py: the CuPy kernels of the backward through fixed statistics.

The simulated GPU's cupy has no kernels, so the module runs CuPy ufuncs there
(tests/test_backward_inference.py checks those results). Here the kernels themselves are checked
in the two ways a machine without a GPU allows: their C bodies, interpreted with NumPy on the
simulated GPU, compute the reference; and the CUDA source CuPy generates from them compiles with
NVRTC for every dtype combination (skipped where NVRTC or the CUDA headers are missing).
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest

import cudnn_bn
from conftest import DTYPES, make_case, shape_for
from cudnn_bn import Mode, fused, reference
from cudnn_bn._core.tolerances import assert_close
from cudnn_bn._cudnn import frozen
from fake_cudnn import FakeArray
from test_backward_inference import _statistics

_TYPE_NAME = re.compile(r"^[A-Z]$")  # a type placeholder of CuPy's kernel parameters


def _parameters(text):
    """[(ctype, name)] of a CuPy kernel's parameter list."""
    return [tuple(part.split()) for part in text.split(",") if part.strip()]


def _python(expression: str, types: dict) -> str:
    """A C expression of the kernels' bodies as Python: ``static_cast<P>(e)`` and ``(P)e`` become
    casts to the bound dtype, ``rsqrt`` a NumPy function."""
    expression = re.sub(r"static_cast<(\w+)>", r"_as_\1", expression)
    while True:  # C casts, innermost first: (type) before an identifier or a parenthesized operand
        match = re.search(r"\((\w+)\)\s*(\w+|\()", expression)
        if match is None or match.group(1) not in types:
            break
        start, operand = match.start(), match.end(1) + 1
        if expression[operand:].lstrip().startswith("("):
            depth, end = 0, operand
            for end in range(operand, len(expression)):
                depth += {"(": 1, ")": -1}.get(expression[end], 0)
                if depth == 0 and expression[end] == ")":
                    break
            operand_text, rest = expression[operand:end + 1], expression[end + 1:]
        else:
            operand_text, rest = match.group(2), expression[match.end():]
        expression = f"{expression[:start]}_as_{match.group(1)}({operand_text.strip()}){rest}"
    return expression


class _InterpretedKernel:
    """Stands in for cupy.ElementwiseKernel and cupy.ReductionKernel: runs the body's statements
    (``type name = expr;``, ``name = expr;``) with NumPy, each type placeholder bound to the dtype
    of the argument that carries it, as CuPy binds it, and C's float arithmetic kept in its type."""

    made: list = []

    def __init__(self, in_params, out_params, body, name, reduction=None):
        self.inputs, self.outputs = _parameters(in_params), _parameters(out_params)
        self.body, self.name, self.reduction = body, name, reduction
        _InterpretedKernel.made.append(name)

    @classmethod
    def elementwise(cls, in_params, out_params, body, name):
        return cls(in_params, out_params, body, name)

    @classmethod
    def reducing(cls, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, name):
        assert (reduce_expr, identity) == ("a + b", "0"), "only sums are interpreted"
        return cls(in_params, out_params, post_map_expr, name, reduction=map_expr)

    def _types(self, arguments):
        types = {"double": np.dtype(np.float64)}
        for (ctype, _), value in zip(self.inputs + self.outputs, arguments):
            if _TYPE_NAME.match(ctype):
                types[ctype] = np.asarray(value).dtype
            elif ctype == "float64":
                types[ctype] = np.dtype(np.float64)
        return types

    def _run(self, body, names, types):
        for ctype, dtype in types.items():
            names[f"_as_{ctype}"] = lambda value, dtype=dtype: np.asarray(value).astype(dtype)
        names["rsqrt"] = lambda value: 1.0 / np.sqrt(value)
        for statement in filter(str.strip, body.split(";")):
            target, expression = statement.split("=", 1)
            words = target.split()
            value = eval(_python(expression, types), {}, names)  # noqa: S307
            names[words[-1]] = np.asarray(value).astype(types[words[0]]) if len(words) == 2 else value
        return names

    def __call__(self, *arguments, axis=None):
        cupy = sys.modules["cupy"]
        inputs = [a.get() if isinstance(a, FakeArray) else a for a in arguments[: len(self.inputs)]]
        names = {name: value for (_, name), value in zip(self.inputs, inputs)}
        types = self._types(inputs + list(arguments[len(self.inputs):]))
        if self.reduction is not None:
            (_, output), = self.outputs
            types.setdefault(self.outputs[0][0], types["P"])
            scope = {**self._run("", dict(names), types), **names}  # the casts, and the inputs
            mapped = eval(_python(self.reduction, types), {}, scope)  # noqa: S307
            names["a"] = np.add.reduce(np.asarray(mapped), axis=axis, dtype=types[self.outputs[0][0]])
            return cupy.asarray(self._run(self.body, names, types)[output])
        names = self._run(self.body, names, types)
        outputs = arguments[len(self.inputs):]
        for (_, name), out in zip(self.outputs, outputs):
            out[...] = np.broadcast_to(names[name], out.shape)
        return outputs[0]


@pytest.fixture
def interpreted_kernels(fresh_simulated_gpu, monkeypatch):
    cupy = sys.modules["cupy"]
    monkeypatch.setattr(cupy, "ElementwiseKernel", _InterpretedKernel.elementwise, raising=False)
    monkeypatch.setattr(cupy, "ReductionKernel", _InterpretedKernel.reducing, raising=False)
    monkeypatch.setattr(frozen, "_KERNELS", {})
    _InterpretedKernel.made = []
    return _InterpretedKernel.made


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode,ndim,channel_axis", [(Mode.SPATIAL, 4, 1), (Mode.SPATIAL, 5, -1),
                                                    (Mode.PER_ACTIVATION, 4, -1), (Mode.PER_ACTIVATION, 2, 1)])
def test_the_kernel_bodies_compute_the_reference(interpreted_kernels, mode, ndim, channel_axis, dtype):
    layout, x, dy, gamma, _ = make_case(shape_for(ndim, channel_axis), mode, channel_axis, dtype, seed=3, offset=50.0)
    mean, var = _statistics(layout, dtype, seed=4, offset=50.0)
    for parameters in ((gamma, mean, var), (gamma.astype(np.float64), mean.astype(np.float64), var)):
        device = [np.array(a, copy=True).view(FakeArray) for a in (x, dy, parameters[0], parameters[1], parameters[2])]
        got = cudnn_bn.backward_inference(*device, mode=mode, channel_axis=channel_axis)
        expected = reference.backward_inference(x, dy, *parameters, mode=mode, channel_axis=channel_axis)
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_close(a, b, dtype, what=name, scale=1.0 if name == "dx" else layout.count)
    assert interpreted_kernels == ["cudnn_bn_fixed_statistics", "cudnn_bn_fixed_statistics_dx",
                                   "cudnn_bn_fixed_statistics_dgamma"]  # each made once, then reused


def test_the_parameter_kernel_splits_the_mean_and_computes_in_float64(interpreted_kernels):
    cupy = sys.modules["cupy"]
    mean = np.array([3000.0 + 1e-4 / 3, -1.0 / 3, 0.5])
    var, gamma = np.array([1e-8, 4.0, 0.0]), np.array([2.0, 1.0, 1.0], np.float32)
    outputs = [cupy.empty(3, np.float32) for _ in range(4)]
    frozen._kernel(cupy, "cudnn_bn_fixed_statistics")(*(cupy.asarray(a) for a in (gamma, mean, var)), 1e-5, *outputs)
    scale, inv_std, high, low = (o.get() for o in outputs)
    exact_inv_std = 1.0 / np.sqrt(var + 1e-5)
    np.testing.assert_array_equal(inv_std, exact_inv_std.astype(np.float32))
    np.testing.assert_array_equal(scale, (gamma * exact_inv_std).astype(np.float32))
    np.testing.assert_array_equal(high, mean.astype(np.float32))
    np.testing.assert_array_equal(low, (mean - high.astype(np.float64)).astype(np.float32))
    assert low[0] != 0 and abs(high[0] + np.float64(low[0]) - mean[0]) < 1e-10  # the rest of the float64 mean


def test_the_fused_variant_masks_then_runs_the_same_kernels(interpreted_kernels, monkeypatch):
    from cudnn_bn._cudnn import fused_ops

    masked = []
    monkeypatch.setattr(fused_ops, "activation_grad", None)  # what frozen imported is what runs
    monkeypatch.setattr(frozen, "activation_grad", lambda cupy, y, dy, activation: masked.append(activation) or
                        cupy.asarray(np.where(y.get() > 0, dy.get(), 0)))
    layout, x, dy, gamma, beta = make_case((4, 3, 2, 2), "spatial", 1, np.float32, seed=5)
    mean, var = _statistics(layout, np.float32, seed=6)
    y = fused.forward_inference(x, gamma, beta, mean, var)
    got = fused.backward_inference(*(np.array(a, copy=True).view(FakeArray) for a in (x, y, dy, gamma, mean, var)))
    expected = fused.backward_inference(x, y, dy, gamma, mean, var)
    assert masked == [cudnn_bn.Activation.RELU]
    np.testing.assert_array_equal(got[1].get(), expected[1])
    for name, a, b in zip(("dx", "dgamma", "dbeta"), (got[0], got[2], got[3]), (expected[0], *expected[2:])):
        assert_close(a, b, np.float32, what=name, scale=1.0 if name == "dx" else layout.count)


def test_a_settled_signature_is_checked_once_and_a_new_one_again(fresh_simulated_gpu, monkeypatch):
    checks = []
    real = frozen.check_backward_inference
    monkeypatch.setattr(frozen, "check_backward_inference", lambda *a, **k: checks.append(1) or real(*a, **k))
    layout, x, dy, gamma, _ = make_case((4, 3, 2, 2), "spatial", 1, np.float32, seed=7)
    mean, var = _statistics(layout, np.float32, seed=8)
    device = [np.array(a, copy=True).view(FakeArray) for a in (x, dy, gamma, mean, var)]
    for _ in range(3):
        cudnn_bn.backward_inference(*device)
    cudnn_bn.backward_inference(*device, eps=1e-3)
    assert len(checks) == 2


# ---- the CUDA source CuPy builds from the bodies, compiled by NVRTC ----

def _nvrtc_and_headers():
    """(nvrtc module, include options), or a reason to skip."""
    try:
        from cuda import pathfinder
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        import cupy
    except Exception as error:  # no NVRTC library, or no CuPy
        return None, f"NVRTC is not usable here ({type(error).__name__}: {error})"
    cuda_headers = pathfinder.find_nvidia_header_directory("cudart")
    if cuda_headers is None or not os.path.exists(os.path.join(cuda_headers, "cuda_fp16.h")):
        return None, "no CUDA headers (cuda_fp16.h, which CuPy's float16 includes) found by cuda.pathfinder"
    include = os.path.join(os.path.dirname(cupy.__file__), "_core", "include")
    cccl = [os.path.join(include, "cupy", "_cccl", part) for part in ("thrust", "libcudacxx", "cub")]
    return nvrtc, ["-I" + path for path in [include, *cccl, cuda_headers]] + ["--std=c++17", "-arch=compute_80"]


def _generated_sources():
    """(label, CUDA source) of every kernel for every dtype combination, from CuPy's own code
    generator (private: a CuPy whose generator differs skips the test, saying so)."""
    import cupy
    import cupy._core._kernel as kernel_module
    import cupy._core._reduction as reduction_module
    from cupy._core.core import _ndarray_base

    array_kind, indexer_kind, scalar_kind = 1, 2, 3  # CuPy's _ArgInfo kinds

    def array(dtype, ndim):
        return kernel_module._ArgInfo(array_kind, _ndarray_base, np.dtype(dtype), ndim, False, True)

    def scalar(dtype):
        return kernel_module._ArgInfo(scalar_kind, np.dtype(dtype).type, np.dtype(dtype), 0, True, True)

    def indexer(ndim):
        return kernel_module._ArgInfo(indexer_kind, object, None, ndim, True, True)

    def elementwise(spec, inputs, outputs, ndim):
        made = cupy.ElementwiseKernel(*spec, "k")
        in_dtypes = tuple(np.dtype(d) for _, d in inputs)
        _, _, types = kernel_module._decide_params_type(made.in_params, made.out_params, in_dtypes,
                                                        tuple(np.dtype(d) for d in outputs))
        infos = tuple(array(d, ndim) if kind == "array" else scalar(d) for kind, d in inputs)
        infos += tuple(array(d, ndim) for d in outputs) + (indexer(ndim),)
        return kernel_module._get_elementwise_kernel_code(infos, types, made.params, made.operation, made.name,
                                                          made.preamble)

    def reduction(spec, in_dtypes, out_dtype):
        made = cupy.ReductionKernel(*spec, "k")
        in_dtypes = tuple(np.dtype(d) for d in in_dtypes)
        _, _, types = reduction_module._decide_params_type(made.in_params, made.out_params, in_dtypes,
                                                           (np.dtype(out_dtype),))
        infos = tuple(array(d, 4) for d in in_dtypes) + (array(out_dtype, 1), indexer(4), indexer(1), scalar("i4"))
        input_expr = "\n".join(f"const {p.ctype} {p.name} = _raw_{p.name}[_in_ind.get()];" for p in made.in_params)
        output_expr = "\n".join(f"{p.ctype} &{p.name} = _raw_{p.name}[_out_ind.get()];" for p in made.out_params)
        return reduction_module._create_reduction_function_code(
            "k", 256, made.out_params[0].ctype, made._params, infos, made.identity, made.map_expr, made.reduce_expr,
            made.post_map_expr, types, input_expr, output_expr, made.preamble, ())

    floats = ("float16", "float32", "float64")
    for data in floats:
        param = "float64" if data == "float64" else "float32"
        yield f"dx {data}", elementwise(frozen._DX, [("array", data), ("array", param)], [data], 4)
        yield f"dgamma {data}", reduction(frozen._DGAMMA, (data, data, param, param, param), param)
    # gamma, mean and var of one dtype each, and one mixture (each has a type placeholder of its own)
    for gamma, mean, var in [(d, d, d) for d in floats] + [("float32", "float64", "float16")]:
        for param in ("float32", "float64"):
            inputs = [("array", gamma), ("array", mean), ("array", var), ("scalar", "float64")]
            label = f"parameters {gamma} {mean} {var} -> {param}"
            yield label, elementwise(frozen._PER_STATISTIC, inputs, [param] * 4, 1)


def test_the_cuda_source_of_every_kernel_compiles(request):
    nvrtc, options = _nvrtc_and_headers()
    if nvrtc is None:
        pytest.skip(options)
    try:
        sources = list(_generated_sources())
    except (AttributeError, TypeError, ValueError, AssertionError) as error:
        pytest.skip(f"CuPy's kernel code generator has another interface here ({type(error).__name__}: {error})")
    # what CuPy puts before every kernel it compiles; IndexT comes from its reduction's options
    header = "".join(f"#include <cupy/{name}>\n" for name in ("complex.cuh", "carray.cuh", "atomics.cuh")) + \
        "typedef int IndexT;\n"
    failures = []
    for label, source in sources:
        program = nvrtc.createProgram(header + source, "kernel.cu", [], [])
        try:
            nvrtc.compileProgram(program, options)
        except Exception:
            failures.append(f"{label}:\n{nvrtc.getProgramLog(program)}")
        finally:
            nvrtc.destroyProgram(program)
    assert len(sources) == 6 + 4 * 2
    assert not failures, "\n".join(failures)
    request.node.user_properties.append(("kernels_compiled", len(sources)))
