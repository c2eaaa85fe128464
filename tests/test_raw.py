"""The raw layer against the real libcudnn and its shipped headers (runs without a GPU)."""

from __future__ import annotations

import ctypes
import os
import re

import pytest

from cudnn_bn._core.modes import Mode
from cudnn_bn._cudnn import raw as _raw
from cudnn_bn._cudnn.raw import ENUMS, PROTOTYPES, Status
from header_check import conformance_problems, parse_headers

REQUIRED = """cudnnGetVersion cudnnGetCudartVersion cudnnGetErrorString cudnnGetLastErrorString cudnnCreate cudnnDestroy
cudnnSetStream cudnnGetStream cudnnCreateTensorDescriptor cudnnSetTensorNdDescriptor cudnnGetTensorNdDescriptor
cudnnDestroyTensorDescriptor
cudnnDeriveBNTensorDescriptor cudnnBatchNormalizationForwardTraining cudnnBatchNormalizationForwardInference
cudnnBatchNormalizationBackward cudnnBatchNormalizationForwardTrainingEx cudnnBatchNormalizationBackwardEx
cudnnGetBatchNormalizationForwardTrainingExWorkspaceSize cudnnGetBatchNormalizationBackwardExWorkspaceSize
cudnnGetBatchNormalizationTrainingExReserveSpaceSize cudnnCreateActivationDescriptor cudnnSetActivationDescriptor
cudnnDestroyActivationDescriptor cudnnQueryRuntimeError""".split()


def test_table_has_every_required_function_and_the_library_exports_them(cudnn_library):
    assert sorted(PROTOTYPES) == sorted(REQUIRED)
    for name in REQUIRED:
        assert callable(getattr(cudnn_library, name))


# prototypes that only the tests call, and why the table keeps them
CALLED_BY_TESTS_ONLY = {
    "cudnnGetErrorString": "test_error_string_for_every_status holds the Status table to the library's names",
}


def test_every_prototype_is_called_by_the_package_or_the_simulator():
    """The table declares what something calls: the package (raw.py's own status check included)
    or the simulated GPU. A prototype nothing calls is dead weight for the header check."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(_raw.__file__)))
    sources = []
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    sources.append(handle.read())
    with open(os.path.join(os.path.dirname(__file__), "fake_cudnn.py"), encoding="utf-8") as handle:
        sources.append(handle.read())
    table = re.compile(r"^PROTOTYPES = \{\n.*?^\}\n", re.MULTILINE | re.DOTALL)
    code = "\n".join(table.sub("", source) for source in sources)  # the table's own entries do not count
    uncalled = [name for name in PROTOTYPES if not re.search(rf"\b{name}\b", code)]
    assert uncalled == sorted(CALLED_BY_TESTS_ONLY)


def test_every_prototype_matches_the_header(cudnn_headers):
    assert conformance_problems(PROTOTYPES, cudnn_headers) == []


@pytest.mark.parametrize(
    "name,wrong,expected",
    [
        ("cudnnBatchNormalizationForwardTraining", lambda r, a: (r, a[:-1]), "16 parameters in the table, 17"),
        ("cudnnBatchNormalizationBackward", lambda r, a: (r, a[:16] + (ctypes.c_float,) + a[17:]),
         "parameter 16 is float in the table, double"),
        ("cudnnSetStream", lambda r, a: (r, (a[0], ctypes.c_int)), "parameter 1 is int in the table, pointer"),
        ("cudnnGetVersion", lambda r, a: (ctypes.c_int, a), "returns int in the table, size_t"),
        ("cudnnSetActivationDescriptor", lambda r, a: (r, a[:3] + (ctypes.c_void_p,)),
         "parameter 3 is pointer in the table, double"),
    ],
)
def test_conformance_check_catches_a_wrong_prototype(cudnn_headers, name, wrong, expected):
    table = dict(PROTOTYPES)
    table[name] = wrong(*table[name])
    problems = conformance_problems(table, cudnn_headers)
    assert len(problems) == 1 and problems[0].startswith(name) and expected in problems[0]


def test_conformance_check_catches_an_unknown_function(cudnn_headers):
    table = {**PROTOTYPES, "cudnnBatchNormalizationForwardTrainingExtra": PROTOTYPES["cudnnCreate"]}
    assert conformance_problems(table, cudnn_headers) == ["cudnnBatchNormalizationForwardTrainingExtra: "
                                                          "not declared in the headers"]


def test_every_enum_member_matches_the_header(cudnn_headers):
    _, members, enum_types, _ = parse_headers(cudnn_headers)
    for c_type, (enum_class, prefix) in ENUMS.items():
        assert c_type in enum_types
        for member in enum_class:
            assert members[prefix + member.name] == member.value, f"{c_type} {member.name}"
    for mode in Mode:
        assert members["CUDNN_BATCHNORM_" + mode.name] == mode.value


def test_every_header_status_is_known(cudnn_headers):
    _, members, _, _ = parse_headers(cudnn_headers)
    header_statuses = {value for name, value in members.items()
                       if name.startswith("CUDNN_STATUS_") and value is not None}
    assert header_statuses <= {s.value for s in Status}


def test_version_and_path(cudnn_library, cudnn_headers):
    assert cudnn_library.version >= _raw.MIN_VERSION
    assert os.path.isfile(cudnn_library.path) and "libcudnn" in os.path.basename(cudnn_library.path)
    version_header = os.path.join(os.path.dirname(os.path.dirname(cudnn_library.path)), "include", "cudnn_version.h")
    if os.path.exists(version_header):
        text = open(version_header).read()
        major, minor, patch = (int(re.search(rf"#define CUDNN_{part}\s+(\d+)", text).group(1))
                               for part in ("MAJOR", "MINOR", "PATCHLEVEL"))
        assert cudnn_library.version == major * 10000 + minor * 100 + patch


def test_library_is_loaded_once(cudnn_library):
    assert _raw.library() is cudnn_library


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.name)
def test_error_string_for_every_status(cudnn_library, status):
    assert cudnn_library.cudnnGetErrorString(status).decode() == f"CUDNN_STATUS_{status.name}"


def test_a_rejected_argument_raises_with_cudnns_detail(cudnn_library):
    from cudnn_bn import CudnnBadParamError
    from cudnn_bn._cudnn.descriptors import TensorDescriptor

    with TensorDescriptor() as descriptor:
        dims, strides = (ctypes.c_int * 4)(2, -3, 4, 5), (ctypes.c_int * 4)(60, 20, 5, 1)
        with pytest.raises(CudnnBadParamError) as caught:
            cudnn_library.cudnnSetTensorNdDescriptor(descriptor.pointer, 0, 4, dims, strides)
    error = caught.value
    assert error.status == Status.BAD_PARAM and error.status_name == "CUDNN_STATUS_BAD_PARAM"
    assert error.function == "cudnnSetTensorNdDescriptor"
    assert str(error).startswith("cudnnSetTensorNdDescriptor: CUDNN_STATUS_BAD_PARAM (")
    assert "-3" in error.detail


def test_create_without_a_gpu_is_not_initialized(cudnn_library):
    from cudnn_bn import CudnnNotInitializedError
    from cudnn_bn._cudnn.availability import cudnn_status
    from cudnn_bn._cudnn.handles import Handle

    if cudnn_status()[0]:
        pytest.skip("a GPU is present here; this checks the no-GPU message")
    with pytest.raises(CudnnNotInitializedError, match="no usable CUDA GPU or driver") as caught:
        Handle(0)
    assert caught.value.status == Status.NOT_INITIALIZED and caught.value.function == "cudnnCreate"
