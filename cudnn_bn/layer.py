"""``BatchNorm``: a layer that keeps its parameters, running statistics and what backward needs.

State names and meanings follow ``torch.nn.BatchNorm2d`` (weight, bias, running_mean,
running_var holding the unbiased variance, num_batches_tracked), so ``state_dict()`` moves
between the two, also with a module prefix such as nn.Sequential's ``'1.'``.

A layer may be frozen (``frozen=True``, :meth:`BatchNorm.freeze`): it then normalizes with its
running statistics in training mode too, never updates them, and backpropagates through them
(cudnn_bn.backward_inference), as fine-tuning and detection models freeze batch norm. The frozen
state is the layer's, not part of state_dict.
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _api, fused
from ._core.arrays import array_kind, host_array
from ._core.layout import MAX_NDIM, make_layout, policy_shape
from ._core.modes import AUTO, Activation, Mode, parse_activation, parse_mode, parse_on_overflow
from ._core.policy import INFERENCE, TRAINING, choose_mode
from ._core.scalars import check_channel_axis, check_eps, check_momentum
from ._core.validate import DATA_DTYPES, param_dtype_for

__all__ = ["BatchNorm", "FixedStatistics", "KeptForBackward", "LoadResult"]

_ARRAY_LIBRARIES = ("numpy", "cupy")
_NUMPY_LAYER = "A layer with xp='numpy' runs the NumPy reference."  # the way out when cupy cannot serve
_INT32_MAX = 2**31 - 1  # cuDNN describes every dim as a C int
_COUNT_MAX = 2**63 - 1  # num_batches_tracked is stored as int64, as torch does
_NOTHING_TO_FREEZE = (
    "{name}: a layer with track_running_stats=False has no running statistics to freeze (it normalizes "
    "with each batch's own), got {got}; build it with track_running_stats=True"
)


class LoadResult(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` did not match (torch's ``_IncompatibleKeys``)."""

    missing_keys: list
    unexpected_keys: list


class FixedStatistics(NamedTuple):
    """What a forward that normalized with the running statistics (eval mode, or a frozen layer)
    keeps for its backward: the statistics it used and the settings it ran with."""

    mean: Any
    var: Any
    mode: Mode
    eps: float
    channel_axis: int
    activation: Activation | None
    has_residual: bool


class KeptForBackward(NamedTuple):
    """What a forward of a layer keeps for its backward (BatchNorm and SyncBatchNorm).

    x: the forward's input. saved: its SavedStats, a FusedSaved when an activation ran, or
    FixedStatistics when it normalized with the running statistics. y: the forward's output when
    an activation ran (backward reads the activation's mask from it), else None. group: the
    communicator a SyncBatchNorm forward ran over (its backward then runs over the same group),
    None for a single-process forward.
    """

    x: Any
    saved: Any
    y: Any = None
    group: Any = None


class BatchNorm:
    """Batch normalization over numpy (reference) or cupy (cuDNN) arrays.

    Args:
        num_features: C (a positive int), or for PER_ACTIVATION the feature shape ``x.shape[1:]``
            (a tuple of positive ints).
        mode: a Mode, its name, or "auto" (the policy in docs/modes.md, decided per call). A
            feature shape of more than one dim needs mode="per_activation".
        eps: added to the variance; at least 2**-126 (about 1.2e-38), since the layer trains and
            training refuses eps = 0 (a constant channel would get an infinite inverse std).
        momentum: running-statistics factor in [0, 1]; None for the cumulative moving average
            (factor ``1 / num_batches_tracked`` after counting this batch, as cuDNN documents).
        affine: learn gamma and beta; when False they stay 1 and 0 and get no gradients.
        track_running_stats: keep running statistics and use them in eval mode; when False, eval
            mode normalizes with the batch's own statistics.
        channel_axis: 1, or -1 for channels-last input (a numpy integer is accepted).
        dtype: the data dtype (float16, float32 or float64). Inputs of another dtype are refused
            with a TypeError, not converted: convert x yourself or build the layer for its dtype.
            Parameters are float32, or float64 for float64 data.
        xp: the ``numpy`` or ``cupy`` module (or its name): where the state lives and which
            arrays forward accepts. The layer pickles; it stores the library by name.
        activation: None, or "relu" (a :class:`~cudnn_bn.Activation`): forward then returns
            ``act(BN(x) + residual)`` through :mod:`cudnn_bn.fused` (cuDNN's fused Ex call where it
            applies), and backward runs through the activation.
        on_overflow: None (the policy's default), or "raise", "fallback", "deferred", "ignore"
            (an :class:`~cudnn_bn.OnOverflow`): what the training calls do when SPATIAL_PERSISTENT
            overflows (docs/modes.md). With "deferred" no call waits for the GPU; call
            :func:`cudnn_bn.check_overflow` once per step (after backward) to read the flags of
            every layer's calls at once.
        frozen: freeze the statistics (see :meth:`freeze`); needs ``track_running_stats``.

    Attributes: ``gamma`` and ``beta`` (also as torch's ``weight`` and ``bias``), ``running_mean``,
    ``running_var``, ``num_batches_tracked``, ``grad_gamma``, ``grad_beta``, ``grad_residual``
    (with an activation: the gradient of the last forward's residual, or None), ``activation``,
    ``training``, ``frozen``, ``parameters_frozen``. A call that raises leaves all of them as
    they were.
    """

    def __init__(self, num_features, *, mode="auto", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 channel_axis=1, dtype=np.float32, xp=np, activation=None, on_overflow=None, frozen=False):
        shape = _feature_shape(num_features)
        activation = None if activation is None else parse_activation(activation)
        on_overflow = None if on_overflow is None else parse_on_overflow(on_overflow)
        parsed_mode = parse_mode(mode, allow_auto=True)
        if len(shape) > 1 and (parsed_mode == AUTO or parsed_mode.is_spatial):
            raise ValueError(
                f"num_features: a feature shape {shape} is for mode='per_activation' (spatial modes keep one "
                f"statistic per channel), got mode={mode!r}"
            )
        momentum = None if momentum is None else check_momentum(momentum)
        eps = check_eps(eps, training=True)
        channel_axis = check_channel_axis(channel_axis)
        if channel_axis not in (1, -1):
            raise ValueError(f"channel_axis: expected 1 (channels-first) or -1 (channels-last), got {channel_axis}")
        for name, flag in (("affine", affine), ("track_running_stats", track_running_stats), ("frozen", frozen)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name}: expected True or False, got {flag!r}")
        if frozen and not track_running_stats:
            raise ValueError(_NOTHING_TO_FREEZE.format(name="frozen", got="frozen=True"))
        data_dtype = _data_dtype(dtype)
        self._xp = _array_library(xp)
        self.mode, self.eps, self.momentum = mode, eps, momentum
        self.affine, self.track_running_stats, self.channel_axis = bool(affine), bool(track_running_stats), channel_axis
        self.dtype = data_dtype
        self.activation = activation
        self.on_overflow = on_overflow
        self.param_shape = shape
        param_dtype = param_dtype_for(data_dtype)
        try:
            self._gamma = self._xp.ones(shape, dtype=param_dtype)
        except Exception as error:
            _refuse_unusable_device(self._xp, error)
            raise
        self._beta = self._xp.zeros(shape, dtype=param_dtype)
        self.grad_gamma = self.grad_beta = self.grad_residual = None
        if self.track_running_stats:
            self.running_mean = self._xp.zeros(shape, dtype=param_dtype)
            self.running_var = self._xp.ones(shape, dtype=param_dtype)
        else:
            self.running_mean = self.running_var = None
        self.num_batches_tracked = 0
        self.training = True
        self._frozen, self._parameters_frozen = bool(frozen), False
        self._kept: KeptForBackward | None = None  # of the last forward

    # ---- where the state lives ----
    @property
    def xp(self):
        """The array module (numpy or cupy) holding the state."""
        return self._xp

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_xp"] = self._xp.__name__  # a module does not pickle; its name does
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        state["_xp"] = _import_array_library(state["_xp"])
        # a layer pickled before activations, its overflow policy, or freezing existed
        state.setdefault("activation", None)
        state.setdefault("on_overflow", None)
        state.setdefault("grad_residual", None)
        state.setdefault("_frozen", False)
        state.setdefault("_parameters_frozen", False)
        # a layer pickled while it kept a plain tuple: (x, saved), (x, saved, y), or a
        # SyncBatchNorm's (x, saved) with a flag saying whether its forward ran over the group
        kept, over_group = state.get("_kept"), state.pop("_kept_is_group", False)
        if kept is not None and not isinstance(kept, KeptForBackward):
            x, saved, *rest = kept
            group = state.get("group") if over_group else None
            state["_kept"] = KeptForBackward(x, saved, rest[0] if rest else None, group)
        self.__dict__.update(state)

    # ---- parameters, also under torch's names ----
    @property
    def gamma(self):
        """Scale, ``param_shape``, float32 (float64 for float64 data), of ``xp``'s kind."""
        return self._gamma

    @gamma.setter
    def gamma(self, value) -> None:
        self._gamma = self._own_parameter("gamma", value)

    @property
    def weight(self):
        """torch's name for :attr:`gamma`."""
        return self._gamma

    @weight.setter
    def weight(self, value) -> None:
        self._gamma = self._own_parameter("weight", value)

    @property
    def beta(self):
        """Shift, like :attr:`gamma`."""
        return self._beta

    @beta.setter
    def beta(self, value) -> None:
        self._beta = self._own_parameter("beta", value)

    @property
    def bias(self):
        """torch's name for :attr:`beta`."""
        return self._beta

    @bias.setter
    def bias(self, value) -> None:
        self._beta = self._own_parameter("bias", value)

    def _kind_of(self, name: str, value) -> str:
        """``value``'s kind, "numpy" or "cupy"; a TypeError in the layer's terms for anything else,
        with the hint the functions give for an array of another library (how to pass it)."""
        try:
            kind = array_kind(**{name: value})
        except TypeError:
            if value is None or isinstance(value, np.ndarray) or type(value).__module__.split(".")[0] == "cupy":
                raise  # array_kind's own message says what is wrong with it
            from ._cudnn.interop import foreign_array_hint  # only here: numpy users never import _cudnn

            hint = foreign_array_hint(name, value, self._xp.__name__)
            if hint is None:
                raise
            raise TypeError(f"{name}: expected a {self._xp.__name__} array ({self._short()} keeps its state there), "
                            f"got {hint}") from None
        if kind != self._xp.__name__:
            raise TypeError(
                f"{name}: expected a {self._xp.__name__} array ({self._short()} keeps its state there), "
                f"got a {kind} array"
            )
        return kind

    def _own_parameter(self, name: str, value):
        """A parameter assigned by reference: of the layer's kind, dtype and shape."""
        self._kind_of(name, value)
        param_dtype = param_dtype_for(self.dtype)
        if np.dtype(value.dtype) != param_dtype:
            raise TypeError(
                f"{name}: expected dtype {param_dtype} ({self._short()}'s parameter dtype), got {value.dtype}"
            )
        if tuple(value.shape) != self.param_shape:
            raise ValueError(f"{name}: expected shape {self.param_shape}, got {tuple(value.shape)}")
        return value

    # ---- modes ----
    def train(self, mode: bool = True) -> "BatchNorm":
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    # ---- freezing ----
    @property
    def frozen(self) -> bool:
        """Whether the statistics are frozen: forward normalizes with the running statistics in
        training mode too and never updates them nor ``num_batches_tracked``."""
        return self._frozen

    @property
    def parameters_frozen(self) -> bool:
        """Whether gamma and beta are frozen too: backward then leaves ``grad_gamma`` and
        ``grad_beta`` None."""
        return self._parameters_frozen

    def freeze(self, parameters: bool = False) -> "BatchNorm":
        """Freeze the statistics, and with ``parameters=True`` gamma and beta too (torchvision's
        FrozenBatchNorm2d); returns the layer. The state survives ``train()`` and pickling, and is
        not part of ``state_dict``. A layer without running statistics has none to freeze: a
        ValueError. On a layer without affine parameters, ``parameters=True`` changes nothing
        more."""
        if not isinstance(parameters, (bool, np.bool_)):
            raise TypeError(f"parameters: expected True or False, got {parameters!r}")
        if not self.track_running_stats:
            raise ValueError(_NOTHING_TO_FREEZE.format(name=f"{self._short()}.freeze", got="freeze()"))
        self._frozen, self._parameters_frozen = True, bool(parameters)
        return self

    def unfreeze(self) -> "BatchNorm":
        """Undo :meth:`freeze` (statistics and parameters); returns the layer."""
        self._frozen = self._parameters_frozen = False
        return self

    # ---- computation ----
    def _short(self) -> str:
        features = self.param_shape[0] if len(self.param_shape) == 1 else self.param_shape
        return f"BatchNorm({features})"

    def _check_input(self, x, operation: str, *, empty_batch: bool = False) -> None:
        """Refuse an x this layer cannot take, in the layer's own terms (before any state changes);
        ``empty_batch``: accept a batch of 0 samples (a SyncBatchNorm rank's empty shard)."""
        self._kind_of("x", x)
        if np.dtype(x.dtype) != self.dtype:
            raise TypeError(
                f"x: expected dtype {self.dtype} ({self._short()}, dtype={self.dtype}), got {np.dtype(x.dtype)}; "
                f"convert x, or build the layer with dtype={np.dtype(x.dtype).name}"
            )
        shape = policy_shape(x.shape) if empty_batch else x.shape
        mode, _ = choose_mode(self.mode, shape, self.channel_axis, operation)
        layout = make_layout(x.shape, self.channel_axis, mode, empty_batch=empty_batch)
        if layout.param_shape == self.param_shape:
            return
        if mode.is_spatial:
            raise ValueError(
                f"x: expected {self.param_shape[0]} channels at axis {self.channel_axis} ({self._short()}), "
                f"got {layout.channels} (shape {layout.shape})"
            )
        raise ValueError(
            f"x: expected feature shape {self.param_shape} after the batch axis ({self._short()}, mode "
            f"PER_ACTIVATION), got {layout.param_shape} (shape {layout.shape})"
        )

    def _check_forward_arguments(self, x, residual, operation: str, *, empty_batch: bool = False) -> None:
        """Refuse what forward cannot take, before any state changes."""
        self._check_input(x, operation, empty_batch=empty_batch)
        if residual is not None and self.activation is None:
            raise ValueError(f"residual: {self._short()} has no activation, so there is no fused add; "
                             "build the layer with activation='relu', or add the residual yourself")

    def _next_batch_count(self) -> int:
        """``num_batches_tracked`` once this batch is counted, checked before any work: the count
        must be a non-negative integer, and one more must still fit int64 (state_dict's dtype)."""
        count = _batch_count("num_batches_tracked", self.num_batches_tracked)
        if count == _COUNT_MAX:
            raise ValueError(
                f"num_batches_tracked: expected a count below {_COUNT_MAX} (int64's largest, state_dict's dtype) "
                f"so that this batch can be counted, got {count}"
            )
        return count + 1

    def _momentum_for(self, next_count: int) -> float:
        """The running statistics' factor for the batch that makes the count ``next_count``."""
        return float(self.momentum) if self.momentum is not None else 1.0 / next_count

    def forward(self, x, residual=None):
        """Normalize ``x`` and keep what backward needs; in training mode, unless frozen, with the
        batch's statistics, updating the running statistics; else with the running statistics.

        x: (N, C, *spatial), or channels-last with ``channel_axis=-1``; 2 to 5 dims; the layer's
        dtype; numpy or cupy as ``xp``. residual: with an activation, None or an array of x's
        shape and dtype added before it (a ResNet block's shortcut). Returns y of x's shape and
        dtype: ``BN(x)``, or ``act(BN(x) + residual)`` with an activation. Backward reads this y
        (the activation's mask): do not modify it in place before backward.
        """
        training_path = (self.training and not self._frozen) or not self.track_running_stats
        self._check_forward_arguments(x, residual, TRAINING if training_path else INFERENCE)
        common = dict(mode=self.mode, eps=self.eps, channel_axis=self.channel_axis)
        if self.activation is not None:
            common.update(residual=residual, activation=self.activation)
        if training_path:
            counting = self.training and self.track_running_stats
            next_count = self._next_batch_count() if counting else None
            momentum = self._momentum_for(next_count) if counting else 0.0
            train = _api.forward_training if self.activation is None else fused.forward_training
            y, saved = train(x, self._gamma, self._beta, self.running_mean, self.running_var, momentum=momentum,
                             on_overflow=self.on_overflow, **common)
            if counting:  # only a batch that ran is counted
                self.num_batches_tracked = next_count
            self._kept = KeptForBackward(x, saved, None if self.activation is None else y)
            return y
        infer = _api.forward_inference if self.activation is None else fused.forward_inference
        y = infer(x, self._gamma, self._beta, self.running_mean, self.running_var, **common)
        mode, _ = choose_mode(self.mode, x.shape, self.channel_axis, INFERENCE)
        fixed = FixedStatistics(self.running_mean, self.running_var, mode, self.eps, self.channel_axis,
                                self.activation, residual is not None)
        self._kept = KeptForBackward(x, fixed, None if self.activation is None else y)
        return y

    __call__ = forward

    def backward(self, dy):
        """Return dx for the last forward's input; set ``grad_gamma`` and ``grad_beta`` (when affine,
        and None when the parameters are frozen).

        dy: x's shape and dtype. dx has the same; the gradients have ``param_shape``. After a
        forward with the running statistics (eval mode, or a frozen layer) the gradient runs
        through those fixed statistics (cudnn_bn.backward_inference).
        """
        if self._kept is None:
            raise RuntimeError(
                "BatchNorm.backward: needs the input and statistics of a forward(); call forward() first"
            )
        x, saved, y, _ = self._kept
        if isinstance(saved, FixedStatistics):
            common = dict(mode=saved.mode, eps=saved.eps, channel_axis=saved.channel_axis)
            if saved.activation is None:
                dx, dgamma, dbeta = _api.backward_inference(x, dy, self._gamma, saved.mean, saved.var, **common)
                dresidual = None
            else:
                dx, dresidual, dgamma, dbeta = fused.backward_inference(
                    x, y, dy, self._gamma, saved.mean, saved.var, activation=saved.activation, **common
                )
                dresidual = dresidual if saved.has_residual else None
        elif isinstance(saved, fused.FusedSaved):
            dx, dresidual, dgamma, dbeta = fused.backward(x, y, dy, self._gamma, saved)
        else:
            (dx, dgamma, dbeta), dresidual = _api.backward(x, dy, self._gamma, saved), None
        self._set_parameter_gradients(dgamma, dbeta)
        self.grad_residual = dresidual
        return dx

    def _set_parameter_gradients(self, dgamma, dbeta) -> None:
        """``grad_gamma`` and ``grad_beta`` after a backward (of this class or a subclass): when
        affine, these gradients, or None while the parameters are frozen. The flag is read here,
        at backward, whatever it was at forward (the statistics follow the forward)."""
        if self.affine:
            self.grad_gamma, self.grad_beta = (None, None) if self._parameters_frozen else (dgamma, dbeta)

    # ---- state ----
    def _state_names(self) -> list:
        names = []
        if self.affine:
            names += ["weight", "bias"]
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self, *, prefix: str = "") -> dict:
        """Host (numpy) copies under torch.nn.BatchNorm2d's names, each key led by ``prefix``.

        weight, bias, running_mean, running_var: ``param_shape``, the parameter dtype;
        num_batches_tracked: a 0-d int64 array.
        """
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {prefix!r}")
        values = {
            "weight": lambda: host_array(self._gamma),
            "bias": lambda: host_array(self._beta),
            "running_mean": lambda: host_array(self.running_mean),
            "running_var": lambda: host_array(self.running_var),
            "num_batches_tracked": lambda: np.array(self.num_batches_tracked, dtype=np.int64),
        }
        return {prefix + name: values[name]() for name in self._state_names()}

    def load_state_dict(self, state, strict: bool = True, *, prefix: str = "") -> LoadResult:
        """Load a state from :meth:`state_dict` or from torch's BatchNorm (tensors or arrays).

        Args:
            state: a mapping of names to arrays, torch tensors or (for num_batches_tracked) ints.
            strict: as in torch: every name this layer has must be there and no other (under
                ``prefix``). With False, missing entries keep their values and others are ignored.
            prefix: read the entries whose keys start with it, e.g. ``'1.'`` for the second module
                of a torch ``nn.Sequential``; other keys belong to other modules and are ignored.

        Every entry is validated and converted before any is assigned, so a refused state leaves
        the layer as it was. Values must be real numbers (float or integer arrays; complex, bool,
        strings and None are refused) of ``param_shape`` that fit the parameter dtype;
        num_batches_tracked must be a non-negative integer scalar.

        Returns ``LoadResult(missing_keys, unexpected_keys)`` (both empty when strict).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping (a state_dict), got {type(state).__name__}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {prefix!r}")
        if prefix:
            entries = {
                key[len(prefix):]: value
                for key, value in state.items()
                if isinstance(key, str) and key.startswith(prefix)
            }
        else:
            entries = dict(state)
        expected = self._state_names()
        missing = [prefix + name for name in expected if name not in entries]
        unexpected = [prefix + str(key) for key in entries if key not in expected]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state: missing keys {sorted(missing)}, unexpected keys {_listed(unexpected)}"
                + _prefix_hint(state, expected, prefix)
            )
        converted = {name: self._converted(prefix + name, name, entries[name]) for name in expected if name in entries}
        count = converted.pop("num_batches_tracked", None)
        on_device = {name: self._xp.asarray(value) for name, value in converted.items()}
        # everything is valid and in place on the device: only now does the layer change
        targets = {"weight": "_gamma", "bias": "_beta", "running_mean": "running_mean", "running_var": "running_var"}
        for name, array in on_device.items():
            setattr(self, targets[name], array)
        if count is not None:
            self.num_batches_tracked = count
        return LoadResult(missing, unexpected)

    def _converted(self, key: str, name: str, value):
        """One state entry, validated, as a host array of the parameter dtype (or an int count)."""
        if name == "num_batches_tracked":
            plain = isinstance(value, (int, np.integer, bool, np.bool_))
            return _batch_count(f"state[{key!r}]", value if plain else _host_value(key, value))
        host = _host_value(key, value)
        if host.dtype.kind not in "fiu":
            raise TypeError(f"state[{key!r}]: expected real numbers (a float or integer array), got dtype {host.dtype}")
        if host.shape != self.param_shape:
            raise ValueError(f"state[{key!r}]: expected shape {self.param_shape}, got {host.shape}")
        param_dtype = param_dtype_for(self.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            result = host.astype(param_dtype)
        if np.any(np.isfinite(host) & ~np.isfinite(result)):
            raise ValueError(f"state[{key!r}]: expected values that fit {param_dtype}, got some past its range")
        return result

    def __repr__(self) -> str:
        return self._repr_with("BatchNorm", "")

    def _repr_with(self, name: str, more: str) -> str:
        """The repr under ``name``, with ``more`` arguments at the end (what SyncBatchNorm adds);
        a layer whose parameters are frozen too reads as the call that froze it."""
        return (
            f"{name}({self.param_shape if len(self.param_shape) > 1 else self.param_shape[0]}, mode={self.mode!r}, "
            f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, channel_axis={self.channel_axis}, "
            f"dtype={self.dtype.name}, xp={self._xp.__name__}"
            + ("" if self.activation is None else f", activation={str(self.activation)!r}")
            + ("" if self.on_overflow is None else f", on_overflow={str(self.on_overflow)!r}")
            + (", frozen=True" if self._frozen and not self._parameters_frozen else "")
            + more
            + ")"
            + (".freeze(parameters=True)" if self._parameters_frozen else "")
        )


def _feature_shape(num_features) -> tuple[int, ...]:
    items = tuple(num_features) if isinstance(num_features, (tuple, list)) else (num_features,)
    for item in items:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise TypeError(
                f"num_features: expected a positive int or a tuple of them (the feature shape), got {num_features!r}"
            )
    shape = tuple(int(n) for n in items)
    if not shape or any(n < 1 for n in shape):
        raise ValueError(
            f"num_features: expected a positive int or a tuple of them (the feature shape), got {num_features!r}"
        )
    if len(shape) > MAX_NDIM - 1:
        raise ValueError(
            f"num_features: expected at most {MAX_NDIM - 1} feature dims (inputs have at most {MAX_NDIM}), got {shape}"
        )
    if math.prod(shape) > _INT32_MAX:
        raise ValueError(
            f"num_features: expected at most {_INT32_MAX} features (cuDNN's int32 limit), got {math.prod(shape)}"
        )
    return shape


def _data_dtype(dtype) -> np.dtype:
    try:
        resolved = None if dtype is None else np.dtype(dtype)
    except TypeError:
        resolved = None
    # checked for None first: a numpy dtype compares equal to None (np.dtype(None) is float64)
    if resolved is None or resolved not in DATA_DTYPES:
        raise TypeError(f"dtype: expected float16, float32 or float64, got {dtype!r}")
    return resolved


def _array_library(xp) -> types.ModuleType:
    if isinstance(xp, str) and xp in _ARRAY_LIBRARIES:
        return _import_array_library(xp)
    if isinstance(xp, types.ModuleType) and xp.__name__ in _ARRAY_LIBRARIES:
        return xp
    raise TypeError(f"xp: expected the numpy or cupy module (or its name), got {xp!r}")


def _import_array_library(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if name == "numpy":
            raise
        from ._cudnn.availability import cupy_missing

        raise ModuleNotFoundError(f"xp={name!r}: {cupy_missing(error)}. {_NUMPY_LAYER}", name=name) from error


def _refuse_unusable_device(xp, error: Exception) -> None:
    """Raise a RuntimeError that says why, when the layer's state could not be allocated because
    CuPy has no device here (no driver, no GPU); return for any other failure."""
    if xp is np:
        return
    from ._cudnn.availability import cupy_device_problem

    problem = cupy_device_problem(xp)
    if problem is not None:
        raise RuntimeError(
            f"xp='cupy': CuPy cannot allocate the layer's state here: {problem}. {_NUMPY_LAYER}"
        ) from error


def _batch_count(name: str, value) -> int:
    """A non-negative integer scalar (Python, numpy, or a 0-d integer array) as an int."""
    if isinstance(value, np.ndarray):
        if value.shape != ():
            raise ValueError(f"{name}: expected a non-negative integer scalar, got shape {value.shape}")
        if value.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected a non-negative integer scalar, got dtype {value.dtype}")
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a non-negative integer scalar, got {value!r}")
    count = int(value)
    if not 0 <= count <= _COUNT_MAX:
        raise ValueError(f"{name}: expected a non-negative integer scalar that fits int64, got {count}")
    return count


def _host_value(key: str, value) -> np.ndarray:
    """A state entry as a numpy copy on the host."""
    if value is None:
        raise TypeError(f"state[{key!r}]: expected an array, got None")
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"state[{key!r}]: expected a plain array, got a numpy masked array (its mask would be ignored)")
    try:
        return host_array(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"state[{key!r}]: expected an array of real numbers, got {type(value).__name__} ({error})"
        ) from None


def _listed(keys: list, limit: int = 8) -> str:
    keys = sorted(keys)
    return str(keys) if len(keys) <= limit else f"{keys[:limit]} and {len(keys) - limit} more"


def _prefix_hint(state, expected: list, prefix: str) -> str:
    """When every expected name is in the state under one prefix, say which to pass."""
    candidates = set()
    for key in state:
        if isinstance(key, str) and key.endswith(expected[0]) and key != prefix + expected[0]:
            candidates.add(key[: len(key) - len(expected[0])])
    found = sorted(c for c in candidates if all(c + name in state for name in expected))
    if not found:
        return ""
    return f"; the state holds this layer's entries under prefix {found[0]!r}: pass prefix={found[0]!r}"
