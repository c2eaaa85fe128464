"""The public layer (cudnn_bn/_api.py) beyond what the reference and cuDNN-path tests cover."""

from __future__ import annotations

import numpy as np

from cudnn_bn import _api
from cudnn_bn._cudnn import availability
from fake_cudnn import FakeArray, simulated_gpu


def test_cudnn_available_is_the_availability_check(monkeypatch):
    monkeypatch.setattr(availability, "cudnn_status", lambda: (False, "no GPU: checked"))
    assert _api.cudnn_available() == (False, "no GPU: checked")


def test_cudnn_available_answers_on_this_machine():
    usable, reason = _api.cudnn_available()
    assert isinstance(usable, bool) and isinstance(reason, str) and reason
    assert (usable, reason) == availability.cudnn_status()


def test_cudnn_available_on_the_simulated_gpu(monkeypatch, cudnn_library):
    with simulated_gpu(monkeypatch):
        usable, reason = _api.cudnn_available()
    assert usable, reason


def test_accept_arrays_keeps_numpy_and_cupy_arrays_as_they_are(monkeypatch, cudnn_library):
    x, running = np.zeros((4, 3)), np.zeros(3)
    kind, arrays = _api.accept_arrays(("running",), ("running", "absent"), x=x, running=running, absent=None)
    assert kind == "numpy" and arrays[0] is x and arrays[1] is running and arrays[2] is None
    with simulated_gpu(monkeypatch):
        device = np.zeros((4, 3)).view(FakeArray)
        kind, arrays = _api.accept_arrays((), (), x=device)
        assert kind == "cupy" and arrays[0] is device

