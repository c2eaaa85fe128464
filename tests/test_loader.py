"""Finding libcudnn: the override variable, the not-found error, the version floor, lazy import.
Each case runs in a fresh interpreter so this process's loaded library stays as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> dict:
    environment = {**os.environ, "PYTHONPATH": ROOT, **env}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_loads_neither_cupy_nor_libcudnn():
    out = _run(
        """
        import json, sys, numpy as np, cudnn_bn
        x = np.ones((4, 2), np.float32) * np.arange(4, dtype=np.float32)[:, None]
        cudnn_bn.forward_training(x, np.ones(2, np.float32), np.zeros(2, np.float32))
        assert cudnn_bn.check_overflow() is None  # nothing was deferred: nothing to load either
        print(json.dumps({"cupy": "cupy" in sys.modules, "raw": "cudnn_bn._cudnn.raw" in sys.modules,
                          "ctypes_cdll": "cudnn_bn._cudnn.loader" in sys.modules}))
        """
    )
    assert out == {"cupy": False, "raw": False, "ctypes_cdll": False}


def test_bad_override_path_is_library_not_found():
    out = _run(
        """
        import json
        from cudnn_bn import CudnnLibraryNotFoundError
        from cudnn_bn._cudnn import raw as _raw
        try:
            _raw.library()
        except CudnnLibraryNotFoundError as error:
            print(json.dumps({"message": str(error), "searched": error.searched}))
        """,
        CUDNN_BN_LIBRARY="/nonexistent/libcudnn.so.9",
    )
    assert "/nonexistent/libcudnn.so.9" in out["searched"][0]
    assert "pip install" in out["message"] and "CUDNN_BN_LIBRARY" in out["message"]


def test_override_path_is_used_and_recorded(cudnn_library):
    out = _run(
        """
        import json
        from cudnn_bn._cudnn import raw as _raw
        library = _raw.library()
        print(json.dumps({"path": library.path, "via": library.found_via, "version": library.version}))
        """,
        CUDNN_BN_LIBRARY=cudnn_library.path,
    )
    assert out == {"path": cudnn_library.path, "via": "$CUDNN_BN_LIBRARY", "version": cudnn_library.version}


def test_pathfinder_failure_lists_every_place_tried():
    out = _run(
        """
        import json
        from cuda import pathfinder
        def not_found(name):
            raise pathfinder.DynamicLibNotFoundError("searched site-packages, conda, system")
        pathfinder.load_nvidia_dynamic_lib = not_found
        from cudnn_bn import CudnnLibraryNotFoundError
        from cudnn_bn._cudnn import raw as _raw
        try:
            _raw.library()
        except CudnnLibraryNotFoundError as error:
            print(json.dumps({"searched": error.searched, "message": str(error)}))
        """,
        CUDNN_BN_LIBRARY="",
    )
    assert out["searched"][0] == "$CUDNN_BN_LIBRARY: not set"
    assert out["searched"][1].startswith("the nvidia-cudnn wheels: nvidia-cudnn-cu")  # installed here
    assert "cuda.pathfinder" in out["searched"][2] and "searched site-packages, conda, system" in out["searched"][2]
    assert "pip install 'cudnn_bn[cuda12]'" in out["message"]


def test_a_missing_cudnn_wheel_is_named_not_the_dependency_pathfinder_tried_last():
    out = _run(
        """
        import json
        from importlib import metadata
        from cuda import pathfinder
        def not_found(name):
            raise pathfinder.DynamicLibNotFoundError("Failure finding libcublasLt.so")
        pathfinder.load_nvidia_dynamic_lib = not_found
        real_version = metadata.version
        def version(name):
            if name.startswith("nvidia-cudnn"):
                raise metadata.PackageNotFoundError(name)
            return real_version(name)
        metadata.version = version
        from cudnn_bn import CudnnLibraryNotFoundError
        from cudnn_bn._cudnn import raw as _raw
        try:
            _raw.library()
        except CudnnLibraryNotFoundError as error:
            print(json.dumps({"message": str(error)}))
        """,
        CUDNN_BN_LIBRARY="",
    )
    message = out["message"]
    assert "neither nvidia-cudnn-cu12 nor nvidia-cudnn-cu13 is installed" in message
    assert message.index("neither nvidia-cudnn") < message.index("libcublasLt")


def test_too_old_cudnn_is_a_clear_error(cudnn_library):
    out = _run(
        """
        import json
        from cudnn_bn import CudnnVersionError
        from cudnn_bn._cudnn import raw as _raw
        class Old(_raw.Library):
            def __init__(self, loaded):
                super().__init__(loaded)
                self.version = 8905
        _raw.Library = Old
        try:
            _raw.library()
        except CudnnVersionError as error:
            print(json.dumps({"message": str(error), "version": error.version}))
        """
    )
    assert out["version"] == 8905 and "8905" in out["message"] and "too old" in out["message"]


def test_loading_is_thread_safe_and_happens_once(cudnn_library):
    out = _run(
        """
        import json, threading
        from cudnn_bn._cudnn import raw as _raw
        from cudnn_bn._cudnn import loader as _loader
        calls = []
        original = _loader.load_cudnn
        def counting():
            calls.append(1)
            return original()
        _raw.load_cudnn = counting
        results = []
        threads = [threading.Thread(target=lambda: results.append(id(_raw.library()))) for _ in range(16)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(json.dumps({"loads": len(calls), "distinct": len(set(results))}))
        """
    )
    assert out == {"loads": 1, "distinct": 1}
