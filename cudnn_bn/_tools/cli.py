"""Command line: `python -m cudnn_bn {compare,info,bench}`.

Exit status: 0 when everything ran; 1 when some rows of compare or bench failed (each is listed,
and the others still ran); 2 when --require-cudnn finds cuDNN unusable, --torch finds no PyTorch,
arguments conflict, or bench's --json or --markdown file cannot be written (said before anything
runs); 74 (sysexits' EX_IOERR) when the output could not be written (a full disk, a failing
device), said in one line on stderr; 141 (128 + SIGPIPE, what a shell reports for a Unix tool
that a closed pipe stopped) when the reader of stdout went away, as in ``cudnn-bn compare |
head -1``: the command then stops quietly, without a traceback. With stdout closed (``>&-``) the
command runs and its printed output goes nowhere, as Python's print does.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

__all__ = ["main"]


def _cudnn_required(command: str) -> bool:
    """False, after saying why on stderr, when cuDNN is unusable here."""
    from .._cudnn.availability import cudnn_status

    usable, reason = cudnn_status()
    if not usable:
        print(f"{command} --require-cudnn: cuDNN is unusable here, so nothing was run: {reason}", file=sys.stderr)
    return usable


def _compare(args) -> int:
    from .compare import format_table, run_compare

    if args.require_cudnn and args.reference:
        print("compare: --require-cudnn and --reference contradict each other", file=sys.stderr)
        return 2
    if args.require_cudnn and not _cudnn_required("compare"):
        return 2
    dtype = np.dtype(args.dtype)
    backend, rows = run_compare(dtype, force_reference=args.reference)
    print(format_table(backend, rows, dtype))
    failed = [row for row in rows if "error" in row]
    if failed:
        print(f"compare: {len(failed)} row(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _info(args) -> int:
    from .info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


def _unwritable(path) -> str | None:
    """Why a file cannot be written at ``path`` (None: it can, or no path was given)."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a folder"
    if not os.path.isdir(folder):
        return f"its folder {folder} does not exist"
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "permission denied"
    return None


def _bench(args) -> int:
    from .bench import run_bench

    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        problem = _unwritable(path)
        if problem is not None:  # said now, not after the whole run
            print(f"bench {option}: cannot write {path}: {problem}; nothing was run", file=sys.stderr)
            return 2
    if args.require_cudnn and not _cudnn_required("bench"):
        return 2
    if args.torch:
        try:
            import torch  # noqa: F401  (asked for: its columns are wanted)
        except ImportError as error:
            print(f"bench --torch: PyTorch is not importable here ({error})", file=sys.stderr)
            return 2
    return run_bench(json_path=args.json, markdown_path=args.markdown, quick=args.quick, with_torch=args.torch)


def _program_name() -> str:
    """How the user started us: the ``cudnn-bn`` console script, or ``python -m cudnn_bn``."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "cudnn-bn" if script.startswith("cudnn-bn") else "python -m cudnn_bn"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=_program_name(), description="cuDNN batch normalization for CuPy, checked against NumPy"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="run every mode on a standard tensor and report error and time")
    compare.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    compare.add_argument("--reference", action="store_true", help="use the NumPy reference even where a GPU is present")
    compare.add_argument("--require-cudnn", action="store_true",
                         help="fail (exit 2, saying why) where cuDNN is unusable instead of using the reference")
    compare.set_defaults(run=_compare)
    info = commands.add_parser("info", help="cuDNN, CuPy, driver and GPU versions and usable backends")
    info.set_defaults(run=_info)
    bench = commands.add_parser("bench", help="benchmark every mode x operation x dtype x layout")
    bench.add_argument("--json", help="write the results as JSON to this file, rewritten after every row")
    bench.add_argument("--markdown", help="write the results as a markdown table to this file")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    bench.add_argument("--require-cudnn", action="store_true",
                       help="fail (exit 2, saying why) where cuDNN is unusable instead of benchmarking the reference")
    bench.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                       help="CPU: compare with PyTorch on the CPU "
                            "(default: where importable; --no-torch never imports it)")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
        if sys.stdout is not None:  # None when the command started with stdout closed
            sys.stdout.flush()  # a closed pipe shows here at the latest, not in the interpreter's exit
    except BrokenPipeError:
        return _stdout_closed()
    except OSError as error:  # the output could not be written: say so in one line, as Unix tools do
        return _write_failed(args.command, error)
    return status


CLOSED_PIPE_STATUS = 128 + 13  # 128 + SIGPIPE (13 on Linux and macOS; the signal module lacks it on Windows)
WRITE_ERROR_STATUS = 74  # EX_IOERR of sysexits.h (the os module has it on Unix only)


def _write_failed(command: str, error: OSError) -> int:
    """A write failed (ENOSPC, EIO, ...): one line on stderr, then stdout flushed or dropped, so
    that the interpreter's last flush does not fail again with a traceback."""
    try:
        print(f"{_program_name()} {command}: could not write its output: {error}", file=sys.stderr)
    except OSError:
        pass  # stderr is gone too: the status says it
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError:
        _stdout_closed()
    return WRITE_ERROR_STATUS


def _stdout_closed() -> int:
    """The reader of stdout went away: stop quietly, as Unix tools do. Python ignores SIGPIPE, so
    the write raised instead; stdout is pointed at devnull so that the interpreter's last flush
    does not report the same closed pipe again (Python's documentation of the signal module, "Note
    on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return CLOSED_PIPE_STATUS


if __name__ == "__main__":
    sys.exit(main())
