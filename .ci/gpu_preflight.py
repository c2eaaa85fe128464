"""Preflight of `.ci/gpu-validate`: is this machine able to give a GPU verdict at all?

Writes ``preflight.txt`` (``key: value`` lines, flushed one by one so that a crash still leaves
what was found up to that point) into the output folder given as the only argument. On the
simulated GPU (CUDNN_BN_SIMULATED_GPU=1) it checks the simulator the same way and says so on its
first line; the float16 kernel then needs a GPU (the simulator compiles nothing). It exits:

- 0: cuDNN is usable, a float16 CuPy kernel compiles and one call agrees with the reference;
- 1: cuDNN is not usable here (``cudnn_status()`` says why): the validation stops at once;
- 3: cuDNN is usable but something later failed (float16 kernels do not compile, or the first
     call disagrees with the reference): the validation goes on, so that the rest is recorded,
     and the run fails.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_evidence as evidence  # noqa: E402  (the folder of this script, added just above)

EXIT_OK, EXIT_UNUSABLE, EXIT_DEGRADED = 0, 1, 3
ROOT = evidence.ROOT
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the repository is used from its root without an install step
ENVIRONMENT_PREFIXES = ("CUDA", "CUDNN", "CUPY", "LD_LIBRARY_PATH", "NVIDIA", "PYTHONPATH")


class Report:
    """``key: value`` lines written to preflight.txt as they are found, and echoed to stdout."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "w")

    def line(self, key: str, value) -> None:
        text = f"{key}: {value}"
        self._file.write(text + "\n")
        self._file.flush()
        print(text, flush=True)

    def close(self) -> None:
        self._file.close()


def _first_lines(text: str, count: int = 6) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    return " | ".join(lines[:count]) + (" | ..." if len(lines) > count else "")


def _python_facts(report: Report) -> None:
    report.line("python", f"{platform.python_version()} ({sys.executable})")
    report.line("platform", platform.platform())
    import numpy

    import cudnn_bn

    report.line("numpy", numpy.__version__)
    report.line("cudnn_bn", f"{cudnn_bn.__version__} ({os.path.dirname(cudnn_bn.__file__)})")
    for name in sorted(os.environ):
        if name.startswith(ENVIRONMENT_PREFIXES):
            report.line(f"env {name}", os.environ[name])


def _cupy_facts(report: Report):
    try:
        import cupy
    except Exception as error:
        report.line("cupy", f"not importable: {type(error).__name__}: {error}")
        return None
    where = os.path.dirname(getattr(cupy, "__file__", "") or "?")
    report.line("cupy", f"{getattr(cupy, '__version__', '?')} ({where})")
    runtime = cupy.cuda.runtime
    for key, read in (("cuda_runtime", runtime.runtimeGetVersion), ("cuda_driver", runtime.driverGetVersion)):
        try:
            report.line(key, read())
        except Exception as error:
            report.line(key, f"unknown ({type(error).__name__}: {error})")
    try:
        count = runtime.getDeviceCount()
    except Exception as error:
        report.line("devices", f"none ({type(error).__name__}: {error})")
        return cupy
    report.line("devices", count)
    for index in range(count):
        try:
            properties = runtime.getDeviceProperties(index)
            name = properties["name"]
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)  # bytes in CuPy 13 and 14
            report.line(
                f"device {index}",
                f"{name}, compute capability {properties['major']}.{properties['minor']}, "
                f"{properties['totalGlobalMem'] / 2**30:.1f} GiB, {properties['multiProcessorCount']} SMs",
            )
        except Exception as error:
            report.line(f"device {index}", f"unreadable ({type(error).__name__}: {error})")
    return cupy


def _cudnn_library_facts(report: Report) -> None:
    try:
        from cudnn_bn._cudnn import raw

        library = raw.library()
        report.line("cudnn_library", f"{library.version} at {library.path} (found via {library.found_via})")
    except Exception as error:
        report.line("cudnn_library", f"not loadable: {type(error).__name__}: {_first_lines(error)}")


def _fp16_header_locations() -> str:
    """Where a cuda_fp16.h that NVRTC could include lives on this machine (for the diagnosis)."""
    directories = []
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        directories.append(("cuda.pathfinder cudart headers", found))
    except Exception as error:
        directories.append((f"cuda.pathfinder ({type(error).__name__})", None))
    for variable in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(variable):
            directories.append((f"${variable}/include", os.path.join(os.environ[variable], "include")))
    directories += [(path, path) for path in sorted(glob.glob("/usr/local/cuda*/include"))]
    found = []
    for label, directory in directories:
        header = os.path.join(directory, "cuda_fp16.h") if directory else None
        found.append(f"{label}: {header if header and os.path.exists(header) else 'no cuda_fp16.h'}")
    return "; ".join(found)


def _float16_kernel(report: Report, cupy) -> bool:
    """Compile and run one float16 elementwise kernel (NVRTC includes cuda_fp16.h for it)."""
    import numpy

    if evidence.simulated():
        report.line("float16_kernel", "needs a GPU (NVRTC compiles it; the simulated GPU compiles nothing)")
        return True
    report.line("float16_kernel", "compiling ...")
    start = time.perf_counter()
    try:
        twice = cupy.ElementwiseKernel("T x", "T y", "y = x + x", "cudnn_bn_preflight_twice")
        values = cupy.arange(8, dtype=cupy.float16)
        result = twice(values).get()
    except Exception as error:
        text = f"{type(error).__name__}: {error}"
        hint = " (cuda_fp16.h was not found by NVRTC)" if "cuda_fp16.h" in text else ""
        report.line("float16_kernel", f"FAILED{hint}: {_first_lines(text, 12)}")
        report.line("cuda_fp16.h", _fp16_header_locations())
        return False
    expected = 2 * numpy.arange(8, dtype=numpy.float16)
    if not numpy.array_equal(result, expected):
        report.line("float16_kernel", f"FAILED: ran but returned {result.tolist()}, expected {expected.tolist()}")
        return False
    report.line("float16_kernel", f"ok (compiled and ran in {time.perf_counter() - start:.2f} s)")
    report.line("cuda_fp16.h", _fp16_header_locations())
    return True


def _first_call(report: Report, cupy) -> bool:
    """One SPATIAL forward_training through cuDNN against the float64 reference."""
    import numpy

    import cudnn_bn

    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 5)).astype(numpy.float32)
    gamma, beta = (0.5 + rng.random(3)).astype(numpy.float32), rng.standard_normal(3).astype(numpy.float32)
    try:
        y, saved = cudnn_bn.forward_training(*(cupy.asarray(a) for a in (x, gamma, beta)), mode="spatial")
        y = y.get()
    except Exception as error:
        report.line("first_call", f"FAILED: {type(error).__name__}: {_first_lines(error)}")
        return False
    wanted, _ = cudnn_bn.reference.forward_training(
        x.astype(numpy.float64), gamma.astype(numpy.float64), beta.astype(numpy.float64), mode="spatial"
    )
    error = float(numpy.max(numpy.abs(y - wanted)))
    if not error < 1e-4:
        report.line("first_call", f"FAILED: SPATIAL forward_training differs from the reference by {error:.3e}")
        return False
    report.line("first_call", f"ok (SPATIAL forward_training within {error:.1e} of the reference)")
    return True


def _facts(report: Report, section, *args):
    """A section of facts; its failure is recorded, never fatal: only cudnn_status() stops the run."""
    try:
        return section(report, *args)
    except Exception as error:
        report.line(f"{section.__name__.strip('_')}_error", f"{type(error).__name__}: {_first_lines(error)}")
        return None


def main(argv: list[str]) -> int:
    out = argv[1] if len(argv) > 1 else "gpu-out"
    os.makedirs(out, exist_ok=True)
    report = Report(os.path.join(out, evidence.PREFLIGHT))
    start = time.perf_counter()
    try:
        with evidence.gpu_of_this_run():
            return _check(report)
    except Exception as error:
        report.line("preflight_error", _first_lines(traceback.format_exc(), 20))
        report.line("verdict", f"STOP: the preflight itself failed ({type(error).__name__}: {error})")
        return EXIT_UNUSABLE
    finally:
        report.line("preflight_seconds", f"{time.perf_counter() - start:.2f}")
        report.close()


def _check(report: Report) -> int:
    if evidence.simulated():
        report.line("simulated", "yes: the simulated GPU of tests/fake_cudnn.py (host memory, the reference's "
                                 "numbers); nothing here is a GPU result")
    _facts(report, _python_facts)
    _facts(report, _cupy_facts)
    _facts(report, _cudnn_library_facts)
    report.line("cudnn_status", "checking (creates a cuDNN handle) ...")
    from cudnn_bn._cudnn.availability import cudnn_status

    usable, reason = cudnn_status()
    report.line("cudnn_status", f"{'usable' if usable else 'NOT usable'}: {reason}")
    if not usable:
        report.line("verdict", f"STOP: cuDNN is not usable on this machine ({reason}); no GPU test can run")
        return EXIT_UNUSABLE
    import cupy  # importable: cudnn_status() found it

    problems = []
    if not _facts(report, _float16_kernel, cupy):
        problems.append("float16 CuPy kernels do not compile or run")
    if not _facts(report, _first_call, cupy):
        problems.append("the first cuDNN call failed or disagreed with the reference")
    if problems:
        report.line("verdict", "DEGRADED: " + "; ".join(problems) + " (the validation goes on and fails)")
        return EXIT_DEGRADED
    report.line("verdict", "ok (simulated GPU)" if evidence.simulated() else "ok")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
