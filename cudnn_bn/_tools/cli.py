"""Command line: `python -m cudnn_bn {compare,info,bench}`."""

from __future__ import annotations

import argparse
import sys

import numpy as np

__all__ = ["main"]


def _compare(args) -> int:
    from .compare import format_table, run_compare

    dtype = np.dtype(args.dtype)
    backend, rows = run_compare(dtype, force_reference=args.reference)
    print(format_table(backend, rows, dtype))
    return 0


def _info(args) -> int:
    from .info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


def _bench(args) -> int:
    from .bench import run_bench

    return run_bench(json_path=args.json, markdown_path=args.markdown, quick=args.quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cudnn_bn", description="cuDNN batch normalization for CuPy, checked against NumPy")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="run every mode on a standard tensor and report error and time")
    compare.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    compare.add_argument("--reference", action="store_true", help="use the NumPy reference even where a GPU is present")
    compare.set_defaults(run=_compare)
    info = commands.add_parser("info", help="cuDNN, CuPy, driver and GPU versions and usable backends")
    info.set_defaults(run=_info)
    bench = commands.add_parser("bench", help="benchmark every mode x operation x dtype x layout")
    bench.add_argument("--json", help="write the results as JSON to this file")
    bench.add_argument("--markdown", help="write the results as a markdown table to this file")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
