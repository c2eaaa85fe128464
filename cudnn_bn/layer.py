"""``BatchNorm``: a layer that keeps its parameters, running statistics and what backward needs.

State names and meanings follow ``torch.nn.BatchNorm2d`` (weight, bias, running_mean,
running_var holding the unbiased variance, num_batches_tracked), so ``state_dict()`` moves
between the two.
"""

from __future__ import annotations

import numpy as np

from . import _api
from ._core.modes import parse_mode
from ._core.validate import check_eps, check_momentum, param_dtype_for

__all__ = ["BatchNorm"]


class BatchNorm:
    """Batch normalization over numpy (reference) or cupy (cuDNN) arrays.

    Args:
        num_features: C, or for PER_ACTIVATION the feature shape ``x.shape[1:]``.
        mode: a Mode, its name, or "auto" (the policy in docs/modes.md, decided per call).
        eps: added to the variance.
        momentum: running-statistics factor; None for the cumulative moving average
            (factor ``1 / num_batches_tracked`` after counting this batch, as cuDNN documents).
        affine: learn gamma and beta; when False they stay 1 and 0 and get no gradients.
        track_running_stats: keep running statistics and use them in eval mode; when False, eval
            mode normalizes with the batch's own statistics.
        channel_axis: 1, or -1 for channels-last input.
        dtype: the data dtype (float16, float32 or float64); parameters are float32, or float64
            for float64 data.
        xp: ``numpy`` or ``cupy``: where the state lives.
    """

    def __init__(self, num_features, *, mode="auto", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, channel_axis=1, dtype=np.float32, xp=np):
        shape = (int(num_features),) if np.isscalar(num_features) else tuple(int(n) for n in num_features)
        if not shape or any(n < 1 for n in shape):
            raise ValueError(f"num_features: expected a positive int or feature shape, got {num_features!r}")
        momentum = None if momentum is None else check_momentum(momentum)
        parse_mode(mode, allow_auto=True)
        self.mode, self.eps, self.momentum = mode, check_eps(eps), momentum
        self.affine, self.track_running_stats, self.channel_axis = affine, track_running_stats, channel_axis
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.param_shape = shape
        param_dtype = param_dtype_for(self.dtype)
        self.gamma = xp.ones(shape, dtype=param_dtype)
        self.beta = xp.zeros(shape, dtype=param_dtype)
        self.grad_gamma = self.grad_beta = None
        if track_running_stats:
            self.running_mean = xp.zeros(shape, dtype=param_dtype)
            self.running_var = xp.ones(shape, dtype=param_dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        self.training = True
        self._kept = None  # (x, SavedStats) of the last training-mode forward

    def train(self, mode: bool = True) -> "BatchNorm":
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    def _momentum_for_this_batch(self) -> float:
        if self.momentum is None:
            return 1.0 / self.num_batches_tracked
        return float(self.momentum)

    def forward(self, x):
        """Normalize ``x``; in training mode also update the running statistics and keep what
        backward needs."""
        common = dict(mode=self.mode, eps=self.eps, channel_axis=self.channel_axis)
        if self.training or not self.track_running_stats:
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                momentum = self._momentum_for_this_batch()
            else:
                momentum = 0.0
            y, saved = _api.forward_training(x, self.gamma, self.beta, self.running_mean, self.running_var, momentum=momentum, **common)
            self._kept = (x, saved)
            return y
        self._kept = None
        return _api.forward_inference(x, self.gamma, self.beta, self.running_mean, self.running_var, **common)

    __call__ = forward

    def backward(self, dy):
        """Return dx for the last forward's input; set ``grad_gamma`` and ``grad_beta`` (when affine)."""
        if self._kept is None:
            raise RuntimeError(
                "BatchNorm.backward: needs the batch statistics of a forward() in training mode "
                "(or with track_running_stats=False); call forward() first, and not in eval mode"
            )
        x, saved = self._kept
        dx, dgamma, dbeta = _api.backward(x, dy, self.gamma, saved)
        if self.affine:
            self.grad_gamma, self.grad_beta = dgamma, dbeta
        return dx

    def state_dict(self) -> dict:
        """Host (numpy) copies under torch.nn.BatchNorm2d's names."""
        state = {}
        if self.affine:
            state["weight"], state["bias"] = _host(self.gamma), _host(self.beta)
        if self.track_running_stats:
            state["running_mean"], state["running_var"] = _host(self.running_mean), _host(self.running_var)
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state from :meth:`state_dict` or from torch's BatchNorm (tensors or arrays)."""
        expected = set(self.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"state: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
        arrays = {name: _host(value) for name, value in state.items()}
        for name in expected - {"num_batches_tracked"}:
            if arrays[name].shape != self.param_shape:
                raise ValueError(f"state[{name!r}]: expected shape {self.param_shape}, got {arrays[name].shape}")
        targets = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean", "running_var": "running_var"}
        for name, attribute in targets.items():
            if name in arrays:
                current = getattr(self, attribute)
                setattr(self, attribute, self.xp.asarray(arrays[name], dtype=current.dtype))
        if "num_batches_tracked" in arrays:
            self.num_batches_tracked = int(arrays["num_batches_tracked"])

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.param_shape if len(self.param_shape) > 1 else self.param_shape[0]}, mode={self.mode!r}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, channel_axis={self.channel_axis})"
        )


def _host(array) -> np.ndarray:
    """A numpy copy of a numpy/cupy array or a torch tensor."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    elif hasattr(array, "get"):
        array = array.get()
    return np.array(array, copy=True)
