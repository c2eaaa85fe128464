"""The checks of the smoke tier of `.ci/gpu-validate`, in one child process while none crashes or
hangs (CuPy and torch are imported once): the first verdict a GPU machine gives.

    python .ci/gpu_smoke.py --records checks.jsonl [--only CHECK ...]
    python .ci/gpu_smoke.py --list

Exit status: 0 when every check that ran passed, at least one ran and every batch-norm entry point
was called (unless --only chose the checks); 1 otherwise.

- every batch-norm entry point of cuDNN once against the float64 reference, with the tolerance
  table of cudnn_bn/_core/tolerances.py: the plain ForwardTraining, ForwardInference and Backward
  in each mode x float16/float32/float64 x 2-D, NCHW, NHWC, NCDHW, NDHWC; ForwardTrainingEx and
  BackwardEx with their three size queries; the fused Ex kernels with bnOps BN_ACTIVATION and
  BN_ADD_ACTIVATION. Every call to those entry points is counted (with its bnOps for the Ex
  kernels), per check and in all; an entry point that no check called fails the tier;
- the overflow flag of SPATIAL_PERSISTENT on ordinary data (uniform in [-2, 2]) at 32x64x56x56,
  NCHW and NHWC, float32 and float16, each outcome recorded;
- training past cuDNN's batch limits, routed by the package, against the reference;
- one cudnn_bn.compat call, and one BatchNorm layer step in training then in eval mode;
- one call each on torch CUDA tensors through DLPack and through __cuda_array_interface__;
- host microseconds per call of cudnn_bn against torch.nn.functional.batch_norm, same process;
- a one-rank NCCL group through cupyx.distributed (cudnn_bn.distributed.nccl_group).

Each check is independent: it writes a "start" record, runs, synchronizes the device (so that an
asynchronous fault is charged to it) and writes an "end" record with its outcome, "passed",
"failed" (with the first line of the error) or "needs a GPU" (on the simulated GPU, where a
check needs real hardware). A failure does not stop the checks after it. The checks run in a
child process watched by this one: when the child dies in a check (a crash in a native call) or
a check runs past CHECK_LIMIT_S (it is stopped with SIGABRT, which prints its stacks), that check
gets a failed "end" record here and the checks after it run in a new child, with a new CUDA
context. Only when the whole step is cut does a check keep a start and no end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_evidence as evidence  # noqa: E402  (the folder of this script, added just above)

if evidence.ROOT not in sys.path:
    sys.path.insert(0, evidence.ROOT)  # the repository is used from its root without an install step

import numpy as np  # noqa: E402

NEEDS_A_GPU = "needs a GPU"
MODES = ("per_activation", "spatial", "spatial_persistent")
DTYPES = (np.float16, np.float32, np.float64)
# layout name -> (shape in x's own axis order, channel_axis); C = 3 keeps every call off the Ex path
PLAIN_LAYOUTS = {
    "2-D": ((7, 3), 1),
    "NCHW": ((5, 3, 4, 3), 1),
    "NHWC": ((5, 4, 3, 3), -1),
    "NCDHW": ((4, 3, 3, 2, 3), 1),
    "NDHWC": ((4, 3, 2, 3, 3), -1),
}
EX_LAYOUTS = {"NHWC": ((4, 3, 5, 8), -1), "NDHWC": ((3, 2, 3, 4, 8), -1)}  # float16, C % 4 == 0
OVERFLOW_SHAPE = (32, 64, 56, 56)  # N, C, H, W: the first benchmark shape
HOST_TIME_SHAPE, HOST_TIME_CALLS = (8, 16, 4, 4), 1000
EPS, MOMENTUM = 1e-5, 0.1


class NeedsAGpu(Exception):
    """Raised by a check that cannot run on the simulated GPU; its message says what it needs."""


class CheckFailed(AssertionError):
    """A result outside its tolerance, or an outcome the package must not give."""


# ---------------------------------------------------------------- counting entry points ----

class EntryPointCounter:
    """Wraps the batch-norm entry points of the loaded libcudnn (or of the simulated GPU installed
    on it) and counts every call, the Ex kernels by bnOps. Paused around host timings."""

    def __init__(self):
        from cudnn_bn._cudnn import raw

        self.library = raw.library()
        self.originals = {name: getattr(self.library, name) for name in evidence.BATCH_NORM_ENTRY_POINTS}
        self.counts: collections.Counter = collections.Counter()
        self.total: collections.Counter = collections.Counter()
        self.install()

    def install(self) -> None:
        for name, original in self.originals.items():
            setattr(self.library, name, self._counting(name, original))

    def uninstall(self) -> None:
        for name, original in self.originals.items():
            setattr(self.library, name, original)

    def _counting(self, name, original):
        with_ops = name in evidence.EX_OPS_ENTRY_POINTS

        def counted(*args):
            key = f"{name}(bnOps={evidence.BN_OPS_NAMES.get(args[2], args[2])})" if with_ops else name
            self.counts[key] += 1
            self.total[key] += 1
            return original(*args)

        counted.__name__ = name
        return counted

    def take(self) -> dict:
        counts, self.counts = dict(self.counts), collections.Counter()
        return counts

    @contextlib.contextmanager
    def paused(self):
        self.uninstall()
        try:
            yield
        finally:
            self.install()


# ---------------------------------------------------------------- comparisons ----

def _host(array) -> np.ndarray:
    from cudnn_bn._core.tolerances import to_numpy

    return to_numpy(array)


def _scale(expected) -> float:
    return max(1.0, float(np.max(np.abs(expected)))) if np.size(expected) else 1.0


def compare(errors: dict, name: str, actual, expected, dtype, *, statistics=False, spread=0.0, scale=None) -> None:
    """Record the largest absolute difference of ``actual`` from ``expected`` under ``name`` and
    raise CheckFailed when it is outside the tolerance table: (rtol, atol) of the data dtype, the
    absolute part widened by the expected values' scale; statistics to statistics_rtol."""
    from cudnn_bn._core.tolerances import statistics_rtol, tolerance

    got, wanted = _host(actual), np.asarray(expected, dtype=np.float64)
    if got.shape != wanted.shape:
        raise CheckFailed(f"{name}: shape {got.shape}, expected {wanted.shape}")
    if statistics:
        rtol = statistics_rtol(dtype)
        atol = rtol * spread
    else:
        rtol, atol = tolerance(dtype)
        atol *= _scale(wanted) if scale is None else scale
    difference = float(np.max(np.abs(got - wanted))) if got.size else 0.0
    errors[name] = float(f"{difference:.3g}")
    if not np.allclose(got, wanted, rtol=rtol, atol=atol, equal_nan=False):
        raise CheckFailed(
            f"{name}: max abs difference {difference:.3g} from the reference, outside rtol {rtol:g} / atol {atol:.3g}"
        )


def _inputs(shape, mode, channel_axis, dtype, seed=0, spread=1.0):
    """x, dy, gamma, beta, running mean and variance (host arrays) and the layout."""
    from cudnn_bn._core.layout import make_layout
    from cudnn_bn._core.modes import parse_mode
    from cudnn_bn._core.validate import param_dtype_for

    layout = make_layout(shape, channel_axis, parse_mode(mode))
    rng = np.random.default_rng(seed)
    param = param_dtype_for(dtype)
    return layout, {
        "x": (0.5 + spread * rng.standard_normal(shape)).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
        "gamma": (0.5 + rng.random(layout.param_shape)).astype(param),
        "beta": rng.standard_normal(layout.param_shape).astype(param),
        "running_mean": np.zeros(layout.param_shape, param),
        "running_var": np.ones(layout.param_shape, param),
    }


def _wide(host: dict) -> dict:
    return {name: array.astype(np.float64) for name, array in host.items()}


# ---------------------------------------------------------------- the checks ----

class Checks:
    """The checks, in the order they run; each returns the fields its "end" record adds."""

    def __init__(self, counter: EntryPointCounter | None):
        import cupy

        self.cupy, self.counter = cupy, counter
        self.simulated = evidence.simulated()

    def device(self, host: dict) -> dict:
        return {name: self.cupy.asarray(array) for name, array in host.items()}

    def all(self) -> list[tuple[str, object]]:
        checks = []
        for mode in MODES:
            for dtype in DTYPES:
                for layout_name, (shape, axis) in PLAIN_LAYOUTS.items():
                    name = f"plain-{mode}-{np.dtype(dtype).name}-{layout_name}"
                    checks.append((name, lambda m=mode, d=dtype, s=shape, a=axis: self.plain(m, d, s, a)))
        for layout_name, (shape, axis) in EX_LAYOUTS.items():
            checks.append((f"ex-spatial_persistent-float16-{layout_name}", lambda s=shape, a=axis: self.ex(s, a)))
        checks.append(("fused-bn-activation", lambda: self.fused(with_residual=False)))
        checks.append(("fused-bn-add-activation", lambda: self.fused(with_residual=True)))
        for layout_name, axis in (("NCHW", 1), ("NHWC", -1)):
            for dtype in (np.float32, np.float16):
                checks.append((f"overflow-flag-{layout_name}-{np.dtype(dtype).name}",
                               lambda a=axis, d=dtype: self.overflow_flag(a, d)))
        checks.append(("routing-past-the-batch-limits", self.routing))
        checks.append(("compat", self.compat))
        checks.append(("layer-train-then-eval", self.layer))
        # other libraries last: a crash or hang in torch or NCCL costs a new process, and nothing before it
        checks.append(("torch-dlpack", lambda: self.torch_call("dlpack")))
        checks.append(("torch-cuda-array-interface", lambda: self.torch_call("cuda_array_interface")))
        checks.append(("host-time-vs-torch", self.host_time))
        checks.append(("nccl-one-rank", self.nccl_one_rank))
        return checks

    # ---- every entry point against the reference ----
    def plain(self, mode, dtype, shape, axis) -> dict:
        import cudnn_bn
        from cudnn_bn import reference

        layout, host = _inputs(shape, mode, axis, dtype)
        wide, device, errors = _wide(host), self.device(host), {}
        y, saved = cudnn_bn.forward_training(device["x"], device["gamma"], device["beta"], device["running_mean"],
                                             device["running_var"], mode=mode, momentum=MOMENTUM, eps=EPS,
                                             channel_axis=axis)
        running64 = [wide["running_mean"], wide["running_var"]]
        y64, saved64 = reference.forward_training(wide["x"], wide["gamma"], wide["beta"], *running64, mode=mode,
                                                  momentum=MOMENTUM, eps=EPS, channel_axis=axis)
        compare(errors, "y", y, y64, dtype)
        compare(errors, "saved mean", saved.mean, saved64.mean, dtype, statistics=True, spread=1.0)
        compare(errors, "saved inv_std", saved.inv_std, saved64.inv_std, dtype, statistics=True)
        compare(errors, "running mean", device["running_mean"], running64[0], dtype, statistics=True, spread=1.0)
        compare(errors, "running var", device["running_var"], running64[1], dtype, statistics=True)
        grads = cudnn_bn.backward(device["x"], device["dy"], device["gamma"], saved)
        expected_grads = reference.backward(wide["x"], wide["dy"], wide["gamma"], saved64)
        for name, actual, expected in zip(("dx", "dgamma", "dbeta"), grads, expected_grads):
            compare(errors, name, actual, expected, dtype)
        mean, var = host["gamma"] - 0.5, host["gamma"] + 0.25  # any statistics will do; var > 0
        y_eval = cudnn_bn.forward_inference(device["x"], device["gamma"], device["beta"], self.cupy.asarray(mean),
                                            self.cupy.asarray(var), mode=mode, eps=EPS, channel_axis=axis)
        wanted = reference.forward_inference(wide["x"], wide["gamma"], wide["beta"], mean.astype(np.float64),
                                             var.astype(np.float64), mode=mode, eps=EPS, channel_axis=axis)
        compare(errors, "inference y", y_eval, wanted, dtype)
        return {"max_abs_difference": errors, "ran": saved.mode.name}

    def ex(self, shape, axis) -> dict:
        import cudnn_bn
        from cudnn_bn import reference

        plans_cleared()
        mode, dtype = "spatial_persistent", np.float16
        layout, host = _inputs(shape, mode, axis, dtype)
        wide, device, errors = _wide(host), self.device(host), {}
        y, saved = cudnn_bn.forward_training(device["x"], device["gamma"], device["beta"], device["running_mean"],
                                             device["running_var"], mode=mode, eps=EPS, channel_axis=axis,
                                             on_overflow="raise")
        if saved.reserve_space is None:
            raise CheckFailed("the forward did not take the Ex path (no reserve space in its saved statistics)")
        running64 = [wide["running_mean"], wide["running_var"]]
        y64, saved64 = reference.forward_training(wide["x"], wide["gamma"], wide["beta"], *running64, mode=mode,
                                                  eps=EPS, channel_axis=axis)
        compare(errors, "y", y, y64, dtype)
        compare(errors, "saved inv_std", saved.inv_std, saved64.inv_std, dtype, statistics=True)
        compare(errors, "running var", device["running_var"], running64[1], dtype, statistics=True)
        grads = cudnn_bn.backward(device["x"], device["dy"], device["gamma"], saved, on_overflow="raise")
        expected_grads = reference.backward(wide["x"], wide["dy"], wide["gamma"], saved64)
        for name, actual, expected in zip(("dx", "dgamma", "dbeta"), grads, expected_grads):
            compare(errors, name, actual, expected, dtype)
        return {"max_abs_difference": errors}

    def fused(self, with_residual: bool) -> dict:
        from cudnn_bn import fused

        plans_cleared()
        mode, dtype, (shape, axis) = "spatial_persistent", np.float16, EX_LAYOUTS["NHWC"]
        layout, host = _inputs(shape, mode, axis, dtype)
        residual = np.random.default_rng(5).standard_normal(shape).astype(dtype) if with_residual else None
        device, errors = self.device(host), {}
        d_residual = None if residual is None else self.cupy.asarray(residual)
        y, saved = fused.forward_training(device["x"], device["gamma"], device["beta"], residual=d_residual, mode=mode,
                                          channel_axis=axis, on_overflow="raise")
        if saved.path != fused.PATH_FUSED_EX:
            raise CheckFailed(f"the fused forward took the {saved.path} path, not cuDNN's fused Ex kernel")
        grads = fused.backward(device["x"], y, device["dy"], device["gamma"], saved, on_overflow="raise")
        y64, saved64 = fused.forward_training(host["x"], host["gamma"], host["beta"], residual=residual, mode=mode,
                                              channel_axis=axis)
        compare(errors, "y", y, y64, dtype)
        expected = fused.backward(host["x"], y64, host["dy"], host["gamma"], saved64)
        for name, actual, wanted in zip(("dx", "dresidual", "dgamma", "dbeta"), grads, expected):
            if wanted is not None:
                scale = layout.count if name in ("dgamma", "dbeta") else None
                compare(errors, name, actual, wanted, dtype, scale=scale)
        return {"max_abs_difference": errors, "path": saved.path}

    # ---- the overflow flag on ordinary data ----
    def overflow_flag(self, axis, dtype) -> dict:
        import cudnn_bn
        from cudnn_bn import CudnnOverflowError, reference
        from cudnn_bn._core.layout import physical_shape

        shape = physical_shape(OVERFLOW_SHAPE, axis)
        channels = OVERFLOW_SHAPE[1]
        x_host = np.random.default_rng(7).uniform(-2.0, 2.0, shape).astype(dtype)
        gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)
        running = [self.cupy.zeros(channels, np.float32), self.cupy.ones(channels, np.float32)]
        x = self.cupy.asarray(x_host)
        errors = {}
        try:
            y, saved = cudnn_bn.forward_training(x, self.cupy.asarray(gamma), self.cupy.asarray(beta), *running,
                                                 mode="spatial_persistent", channel_axis=axis, on_overflow="raise")
        except CudnnOverflowError:
            restored = bool((_host(running[0]) == 0).all() and (_host(running[1]) == 1).all())
            if not restored:
                raise CheckFailed("the flag was raised but the running statistics were not restored") from None
            return {"flag_raised": True, "detail": "overflow flag raised on ordinary data; running statistics restored"}
        y64, _ = reference.forward_training(x_host.astype(np.float64), gamma, beta, mode="spatial", channel_axis=axis)
        compare(errors, "y", y, y64, dtype)
        return {"flag_raised": False, "path": "Ex" if saved.reserve_space is not None else "plain",
                "max_abs_difference": errors, "detail": "no flag; y matches the reference"}

    # ---- the package's routes around cuDNN's batch limits ----
    def routing(self) -> dict:
        import cudnn_bn
        from cudnn_bn import reference
        from cudnn_bn._cudnn.limits import LIMITS

        errors = {}
        past = LIMITS.per_activation_training_max_batch + 1
        for shape, axis in (((past, 4), 1), ((past, 2, 1, 2), -1)):
            _, host = _inputs(shape, "per_activation", axis, np.float32, seed=3)
            wide, device = _wide(host), self.device(host)
            y, saved = cudnn_bn.forward_training(device["x"], device["gamma"], device["beta"], mode="per_activation",
                                                 eps=EPS, channel_axis=axis)
            y64, saved64 = reference.forward_training(wide["x"], wide["gamma"], wide["beta"], mode="per_activation",
                                                      eps=EPS, channel_axis=axis)
            label = "x".join(map(str, shape))
            compare(errors, f"{label} y", y, y64, np.float32)
            grads = cudnn_bn.backward(device["x"], device["dy"], device["gamma"], saved)
            expected = reference.backward(wide["x"], wide["dy"], wide["gamma"], saved64)
            for name, actual, wanted in zip(("dx", "dgamma", "dbeta"), grads, expected):
                compare(errors, f"{label} {name}", actual, wanted, np.float32)
        shape = (LIMITS.inference_max_batch + 5, 2, 1, 2)
        _, host = _inputs(shape, "spatial", 1, np.float32, seed=4)
        wide = _wide(host)
        y = cudnn_bn.forward_inference(
            *(self.cupy.asarray(host[name]) for name in ("x", "gamma", "beta", "gamma", "gamma")),
            mode="spatial", eps=EPS,
        )
        wanted = reference.forward_inference(wide["x"], wide["gamma"], wide["beta"], wide["gamma"], wide["gamma"],
                                             mode="spatial", eps=EPS)
        compare(errors, "chunked inference y", y, wanted, np.float32)
        return {"max_abs_difference": errors}

    # ---- other libraries' CUDA arrays, compat, the layer ----
    def _torch(self):
        if self.simulated:
            raise NeedsAGpu("torch CUDA tensors")
        import torch

        if not torch.cuda.is_available():
            raise CheckFailed("torch is installed but sees no CUDA device")
        return torch

    def torch_call(self, protocol: str) -> dict:
        import cudnn_bn
        from cudnn_bn import reference

        torch = self._torch()

        class CudaArrayInterfaceOnly:
            def __init__(self, tensor):
                self.tensor = tensor

            @property
            def __cuda_array_interface__(self):
                return self.tensor.__cuda_array_interface__

        wrap = (lambda tensor: tensor) if protocol == "dlpack" else CudaArrayInterfaceOnly
        _, host = _inputs((8, 3, 4, 4), "spatial", 1, np.float32, seed=6)
        tensors = {name: torch.from_numpy(array).cuda() for name, array in host.items()}
        errors = {}
        y, saved = cudnn_bn.forward_training(
            *(wrap(tensors[name]) for name in ("x", "gamma", "beta", "running_mean", "running_var")),
            mode="spatial", momentum=MOMENTUM, eps=EPS,
        )
        wide = _wide(host)
        running64 = [wide["running_mean"], wide["running_var"]]
        y64, _ = reference.forward_training(wide["x"], wide["gamma"], wide["beta"], *running64, mode="spatial",
                                            momentum=MOMENTUM, eps=EPS)
        compare(errors, "y", y, y64, np.float32)
        compare(errors, "running mean (in the torch tensor)", tensors["running_mean"].cpu().numpy(), running64[0],
                np.float32, statistics=True, spread=1.0)
        compare(errors, "running var (in the torch tensor)", tensors["running_var"].cpu().numpy(), running64[1],
                np.float32, statistics=True)
        return {"max_abs_difference": errors, "torch": torch.__version__}

    def compat(self) -> dict:
        from cudnn_bn import compat, reference

        _, host = _inputs((6, 4, 5, 5), "spatial", 1, np.float32, seed=8)
        device, wide, errors = self.device(host), _wide(host), {}
        y, save_mean, save_inv_std = compat.batch_normalization_forward_training(
            device["x"], device["gamma"], device["beta"], device["running_mean"], device["running_var"], None, None,
            EPS, 0.9, True, compat.CUDNN_BATCHNORM_SPATIAL, False)
        y64, saved64 = reference.forward_training(wide["x"], wide["gamma"], wide["beta"], mode="spatial", eps=EPS)
        compare(errors, "y", y, y64, np.float32)
        compare(errors, "save_mean", save_mean, saved64.mean, np.float32, statistics=True, spread=1.0)
        compare(errors, "save_inv_std", save_inv_std, saved64.inv_std, np.float32, statistics=True)
        return {"max_abs_difference": errors}

    def layer(self) -> dict:
        from cudnn_bn import BatchNorm

        rng = np.random.default_rng(9)
        gpu = BatchNorm(4, mode="spatial", dtype=np.float32, xp=self.cupy)
        ref = BatchNorm(4, mode="spatial", dtype=np.float64, xp=np)
        errors = {}
        x = (0.5 + 2.0 * rng.standard_normal((6, 4, 3, 3))).astype(np.float32)
        dy = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
        compare(errors, "train y", gpu(self.cupy.asarray(x)), ref(x.astype(np.float64)), np.float32)
        compare(errors, "train dx", gpu.backward(self.cupy.asarray(dy)), ref.backward(dy.astype(np.float64)),
                np.float32)
        compare(errors, "grad_gamma", gpu.grad_gamma, ref.grad_gamma, np.float32)
        gpu_state, ref_state = gpu.state_dict(), ref.state_dict()
        compare(errors, "running_var", gpu_state["running_var"], ref_state["running_var"], np.float32, statistics=True)
        x = (0.5 + 2.0 * rng.standard_normal((6, 4, 3, 3))).astype(np.float32)
        compare(errors, "eval y", gpu.eval()(self.cupy.asarray(x)), ref.eval()(x.astype(np.float64)), np.float32)
        return {"max_abs_difference": errors}

    # ---- host time, and NCCL ----
    def host_time(self) -> dict:
        import cudnn_bn
        from cudnn_bn._tools.timing import microseconds_per_call

        _, host = _inputs(HOST_TIME_SHAPE, "spatial", 1, np.float32, seed=10)
        device = self.device(host)
        args = (device["x"], device["gamma"], device["beta"], device["running_mean"], device["running_var"])
        synchronize = self.cupy.cuda.Device().synchronize
        with self.counter.paused() if self.counter else contextlib.nullcontext():
            ours = microseconds_per_call(
                lambda: cudnn_bn.forward_training(*args, mode="spatial"), synchronize, HOST_TIME_CALLS
            )
        result = {"shape": list(HOST_TIME_SHAPE), "calls": HOST_TIME_CALLS, "cudnn_bn_us": round(ours, 2)}
        if self.simulated:
            result.update(torch_us=None,
                          detail=f"cudnn_bn {ours:.1f} us per call on the simulated GPU (not a GPU figure); "
                                 "torch.nn.functional.batch_norm's side needs a GPU")
            return result
        torch = self._torch()
        tensors = {name: torch.from_numpy(array).cuda() for name, array in host.items()}
        functional = torch.nn.functional
        theirs = microseconds_per_call(
            lambda: functional.batch_norm(tensors["x"], tensors["running_mean"], tensors["running_var"],
                                          tensors["gamma"], tensors["beta"], training=True, momentum=MOMENTUM, eps=EPS),
            torch.cuda.synchronize, HOST_TIME_CALLS)
        result.update(torch_us=round(theirs, 2), ratio=round(ours / theirs, 3),
                      detail=f"cudnn_bn {ours:.1f} us, torch.nn.functional.batch_norm {theirs:.1f} us per call "
                             "(forward_training, host time)")
        return result

    def nccl_one_rank(self) -> dict:
        if self.simulated:
            raise NeedsAGpu("NCCL through cupyx.distributed")
        # cupyx.distributed imports mpi4py where it is installed, and importing mpi4py starts MPI: in a
        # process no MPI launcher started, that may wait for a process manager. The TCP rendezvous used
        # here needs no MPI. NCCL_DEBUG=WARN puts NCCL's own reason for a failure into the log.
        os.environ.setdefault("MPI4PY_RC_INITIALIZE", "0")
        os.environ.setdefault("NCCL_DEBUG", "WARN")
        from cudnn_bn import distributed, reference

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        group = distributed.nccl_group(1, 0, port=port)
        errors = {}
        try:
            _, host = _inputs((6, 4, 3, 3), "spatial", 1, np.float32, seed=11)
            device, wide = self.device(host), _wide(host)
            y, saved = distributed.forward_training(
                device["x"], device["gamma"], device["beta"], group=group, mode="spatial"
            )
            grads = distributed.backward(device["x"], device["dy"], device["gamma"], saved, group=group)
            y64, saved64 = reference.forward_training(wide["x"], wide["gamma"], wide["beta"], mode="spatial")
            compare(errors, "y", y, y64, np.float32)
            expected_grads = reference.backward(wide["x"], wide["dy"], wide["gamma"], saved64)
            for name, actual, expected in zip(("dx", "dgamma", "dbeta"), grads, expected_grads):
                compare(errors, name, actual, expected, np.float32)
        finally:
            group.close()
        return {"max_abs_difference": errors}


def plans_cleared() -> None:
    """Empty the plan cache, so that a check's Ex plan asks its size queries itself."""
    from cudnn_bn._cudnn import plans

    plans.PLANS.clear()


# ---------------------------------------------------------------- running them ----

def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:400]}" if lines else type(error).__name__


def check_names() -> list[str]:
    """The checks' names in the order they run (no GPU, no CuPy needed)."""
    return [name for name, _ in Checks.__new__(Checks).all()]


def run_checks(records: evidence.RecordWriter, only: list[str] | None) -> list[dict]:
    """Run the checks (all, or ``only`` these) in this process; their "end" records."""
    hang, fault = evidence.hang_request(), evidence.fault_request()
    counter = EntryPointCounter()
    checks = Checks(counter)
    selected = [(name, check) for name, check in checks.all() if not only or name in only]
    ends = []
    for name, check in selected:
        records.write(kind="check", check=name, event="start")
        if hang is not None and hang[0] == name:
            print(f"[smoke] {name}: hanging here, as {evidence.HANG_VARIABLE} asks", flush=True)
            time.sleep(24 * 3600)
        if fault is not None and fault[0] == name:
            print(f"[smoke] {name}: {fault[1]} here, as {evidence.FAULT_VARIABLE} asks", flush=True)
            if fault[1] == "crash":
                import faulthandler

                faulthandler._sigsegv()  # a segmentation fault in native code, as a crashing library call gives
            time.sleep(24 * 3600)
        start = time.perf_counter()
        counter.take()
        fields = {}
        try:
            fields = check() or {}
            checks.cupy.cuda.Device().synchronize()  # an asynchronous fault is this check's
            outcome, detail = "passed", fields.pop("detail", "")
        except NeedsAGpu as error:
            outcome, detail = NEEDS_A_GPU, str(error)
        except Exception as error:  # recorded; the next check runs
            outcome, detail = "failed", _first_line(error)
            print(traceback.format_exc(), flush=True)
        ends.append(records.write(kind="check", check=name, event="end", outcome=outcome,
                                  seconds=round(time.perf_counter() - start, 3), detail=detail,
                                  entry_points=counter.take(), **fields))
    counter.uninstall()
    return ends


def finish_checks(records: evidence.RecordWriter, ends: list[dict], only: list[str] | None) -> int:
    """The entry points called in all (from the "end" records), as a record; the exit status: 0
    when every check that ran passed, at least one ran and every entry point was called."""
    called = collections.Counter()
    for end in ends:
        called.update(end.get("entry_points") or {})
    called = dict(called)
    missing = [] if only else [name for name in evidence.expected_entry_points() if name not in called]
    records.write(kind="entry-points", called=called, expected=evidence.expected_entry_points(), missing=missing)
    outcomes = collections.Counter(end["outcome"] for end in ends)
    print(f"[smoke] {dict(outcomes)}; entry points called: {called}; missing: {missing or 'none'}", flush=True)
    ran = outcomes["passed"] + outcomes["failed"]
    return 0 if ran and not outcomes["failed"] and not missing else 1


# One check may take this long in the process that runs the checks (its first kernels compile, torch
# imports, NCCL starts); past it that process is stopped and the checks after it go on in a new one.
CHECK_LIMIT_S = 30
STOP_GRACE_S = 3  # between the SIGABRT that prints a hung process's stacks and its SIGKILL
RECORD_LINE = "[record] "


class CheckProcess:
    """The checks in a child process, watched from this one: an "end" record for a check whose
    process crashed in it or that ran past CHECK_LIMIT_S, then a new process for the checks after it."""

    def __init__(self, records: evidence.RecordWriter, check_limit_s: float):
        self.records, self.check_limit_s = records, check_limit_s
        self.ends: list[dict] = []
        self.running: tuple[str, float] | None = None  # (check, its start on the monotonic clock)
        self.stopped_hung = False

    def run(self, names: list[str]) -> list[dict]:
        remaining = list(names)
        while remaining:
            before = len(remaining)
            status = self._one_process(remaining)
            if status != 0:
                self.records.start_a_line()  # it may have died in the middle of a record
            if self.running is not None:  # it died in a check, or hung in it
                name, started = self.running
                self.running = None
                seconds = round(time.monotonic() - started, 3)
                if self.stopped_hung:
                    detail = (f"no end after {self.check_limit_s:g} s: the process running the checks was stopped "
                              "(SIGABRT: its stacks are in the log)")
                else:
                    detail = (f"the process running the checks died in this check ({_exit_text(status)}; its stack is "
                              "in the log)")
                if remaining:
                    detail += "; the checks after it ran in a new process"
                self.ends.append(self.records.write(kind="check", check=name, event="end", outcome="failed",
                                                    seconds=seconds, detail=detail, entry_points={},
                                                    process_lost=True))
                if name in remaining:
                    remaining.remove(name)
            elif len(remaining) == before:  # not one check started: it failed before the first, and would again
                for name in remaining:
                    detail = (f"the process running the checks ended before this check ({_exit_text(status)}; "
                              "see the log)")
                    self.ends.append(self.records.write(kind="check", check=name, event="end", outcome="failed",
                                                        seconds=0.0, detail=detail, entry_points={}))
                remaining = []
        return self.ends

    def _one_process(self, remaining: list[str]) -> int:
        command = [sys.executable, "-u", "-X", "faulthandler", os.path.abspath(__file__),
                   "--records", self.records.path, "--child", "--only", *remaining]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", cwd=evidence.ROOT)
        self.stopped_hung = False
        watchdog = threading.Thread(target=self._watch, args=(process,), daemon=True)
        watchdog.start()
        for line in process.stdout:
            print(line, end="", flush=True)
            if line.startswith(RECORD_LINE):
                self._note(line[len(RECORD_LINE):], remaining)
        status = process.wait()
        watchdog.join()
        return status

    def _note(self, text: str, remaining: list[str]) -> None:
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return
        if record.get("kind") != "check":
            return
        if record.get("event") == "start":
            self.running = (record["check"], time.monotonic())
        elif record.get("event") == "end":
            self.running = None
            self.ends.append(record)
            if record["check"] in remaining:
                remaining.remove(record["check"])

    def _watch(self, process) -> None:
        while process.poll() is None:
            running = self.running
            if running is not None and time.monotonic() - running[1] > self.check_limit_s:
                self.stopped_hung = True
                print(f"[smoke] {running[0]}: no end after {self.check_limit_s:g} s; stopping its process", flush=True)
                process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
                try:
                    process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                return
            time.sleep(0.1)


def _exit_text(status: int) -> str:
    if status is not None and status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"exit status {status}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", default="checks.jsonl", help="the JSON-lines file the records are appended to")
    parser.add_argument("--only", nargs="*", help="run only these checks (see --list)")
    parser.add_argument("--list", action="store_true", help="print the checks' names and run nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # run the checks in this process
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(check_names()))
        return 0
    unknown = sorted(set(args.only or ()) - set(check_names()))
    if unknown:
        parser.error(f"--only: unknown checks {unknown} (see --list)")
    records = evidence.RecordWriter(args.records, tier="smoke", step="smoke-checks", simulated=evidence.simulated())
    try:
        if args.child:
            with evidence.gpu_of_this_run():
                run_checks(records, args.only)
            return 0
        fault = evidence.fault_request()
        limit = fault[2] if fault is not None and fault[2] else CHECK_LIMIT_S
        names = [name for name in check_names() if not args.only or name in args.only]
        ends = CheckProcess(records, limit).run(names)
        return finish_checks(records, ends, args.only)
    finally:
        records.close()


if __name__ == "__main__":
    sys.exit(main())
