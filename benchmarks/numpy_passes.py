"""What an exact float64 pass over x costs in NumPy, against PyTorch's whole channels-last call.

The NumPy reference keeps every float32 result equal to its float64 result rounded, so each
elementwise step over x runs in float64: widen x, subtract the mean, multiply, add, narrow. This
times those passes one thread, per element, on blocks of x that stay in cache (as the reference
works), and adds them up to the least a training forward on channels-last data can cost that way:
the statistics (a per-channel sum and a centred sum of squares) and the output pass. Beside it,
torch's F.batch_norm on the same data (channels-last, one thread), when torch is importable. And
for float16 data, what only moving it into float64 and back costs, beside torch's whole float16
inference call.

    python benchmarks/numpy_passes.py [--shape 64 64 32 32]

Figures are CPU time of the calling thread (time.thread_time), medians of 21 repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

_BLOCK_ROWS = 2048  # rows of (rows, C) per block: about 1 MiB of float64 at C = 64


def _median_seconds(function, repeats: int = 21) -> float:
    function()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        function()
        samples.append(time.thread_time() - start)
    return statistics.median(samples)


def pass_costs(shape) -> dict:
    """ns per element of each float64 pass over x of ``shape`` (channels last: an (M, C) matrix),
    each done the cheapest way NumPy offers, so that their sum is a floor: elementwise steps on
    flat blocks with the per-channel values tiled to the block (one long inner loop), the
    per-channel sum as the faster of a reduction over rows and a BLAS product with ones."""
    channels = shape[1]
    rows = int(np.prod(shape)) // channels
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, channels)).astype(np.float32)
    y = np.empty_like(x)
    block = min(_BLOCK_ROWS, rows)
    size = block * channels
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    wide, other = np.empty(size), np.empty(size)
    mean, scale = np.tile(rng.standard_normal(channels), block), np.tile(rng.random(channels) + 0.5, block)
    ones = np.ones(block)
    starts = range(0, rows * channels - size + 1, size)

    def per_element(step):
        def run():
            for start in starts:
                step(slice(start, start + size))

        return _median_seconds(run) / (len(starts) * size) * 1e9

    by_rows = per_element(lambda part: np.add.reduce(wide.reshape(block, channels), axis=0))
    by_blas = per_element(lambda part: ones @ wide.reshape(block, channels))
    return {
        "widen float32 to float64": per_element(lambda part: np.copyto(wide, flat_x[part])),
        "subtract (float64)": per_element(lambda part: np.subtract(wide, mean, out=other)),
        "multiply (float64)": per_element(lambda part: np.multiply(wide, scale, out=other)),
        "add (float64)": per_element(lambda part: np.add(wide, mean, out=other)),
        "narrow float64 to float32": per_element(lambda part: np.copyto(flat_y[part], wide, casting="same_kind")),
        "per-channel sum (float64)": min(by_rows, by_blas),
    }


def half_costs(shape) -> dict:
    """ns per element of moving float16 data into and out of float64: NumPy's casts and the
    reference's bit-pattern conversions (cudnn_bn.reference), on the same flat blocks."""
    from cudnn_bn import reference

    channels = shape[1]
    total = int(np.prod(shape))
    size = min(_BLOCK_ROWS * channels, total)
    x = np.random.default_rng(0).standard_normal(total).astype(np.float16)
    y = np.empty_like(x)
    wide = np.empty(size)
    bits = np.empty((2, size), np.uint32)
    starts = range(0, total - size + 1, size)

    def per_element(step):
        def run():
            for start in starts:
                step(slice(start, start + size))

        return _median_seconds(run) / (len(starts) * size) * 1e9

    np.copyto(wide, x[:size])
    return {
        "float16 to float64, NumPy's cast": per_element(lambda part: np.copyto(wide, x[part])),
        "float16 to float64, the reference's": per_element(
            lambda part: reference._widen_float16(x[part], wide, bits[0])
        ),
        "float64 to float16, NumPy's cast": per_element(lambda part: np.copyto(y[part], wide, casting="same_kind")),
        "float64 to float16, the reference's": per_element(
            lambda part: reference._round_to_float16(wide, y[part], bits)
        ),
    }


def exact_forward_floor(costs: dict) -> dict:
    """ns per element of the least exact training forward: the statistics from one widened copy
    of each block (its sum, then its centred squares, blocks merged by Chan's formula) and the
    output (widen, subtract the mean, multiply by gamma * inv_std, add beta, narrow)."""
    widen, narrow = costs["widen float32 to float64"], costs["narrow float64 to float32"]
    subtract, multiply, add = costs["subtract (float64)"], costs["multiply (float64)"], costs["add (float64)"]
    reduce = costs["per-channel sum (float64)"]
    statistics_passes = widen + reduce + subtract + multiply + reduce
    output_pass = widen + subtract + multiply + add + narrow
    return {"statistics": statistics_passes, "output": output_pass, "total": statistics_passes + output_pass}


def torch_channels_last_ms(shape, dtype="float32", training=True) -> float | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    torch.set_num_threads(1)
    x = torch.randn(*shape).to(getattr(torch, dtype)).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.ones(shape[1]), torch.zeros(shape[1])
    mean, var = torch.zeros(shape[1]), torch.ones(shape[1])
    if training:
        return _median_seconds(lambda: F.batch_norm(x, None, None, weight, bias, training=True)) * 1e3
    return _median_seconds(lambda: F.batch_norm(x, mean, var, weight, bias, training=False)) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 64, 32, 32], help="N C H W (default 64 64 32 32)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    costs = pass_costs(shape)
    floor = exact_forward_floor(costs)
    elements = int(np.prod(shape))
    print(f"x of {'x'.join(map(str, shape))} float32, channels last, one thread; ns per element:")
    for name, value in costs.items():
        print(f"  {name:28s} {value:6.3f}")
    print(f"least exact training forward: statistics {floor['statistics']:.2f} + output {floor['output']:.2f} = "
          f"{floor['total']:.2f} ns per element, {floor['total'] * elements / 1e6:.2f} ms")
    torch_ms = torch_channels_last_ms(shape)
    if torch_ms is not None:
        print(f"torch F.batch_norm, channels last, training: {torch_ms:.2f} ms; the floor is "
              f"{floor['total'] * elements / 1e6 / torch_ms:.2f}x that")
    half = half_costs(shape)
    print("float16, ns per element:")
    for name, value in half.items():
        print(f"  {name:36s} {value:6.3f}")
    moves = half["float16 to float64, the reference's"] + half["float64 to float16, the reference's"]
    print(
        f"float16 in and out alone (the reference's conversions): {moves:.2f} ns per element, "
        f"{moves * elements / 1e6:.2f} ms"
    )
    torch_half_ms = torch_channels_last_ms(shape, "float16", training=False)
    if torch_half_ms is not None:
        print(f"torch F.batch_norm, float16, channels last, inference: {torch_half_ms:.2f} ms; "
              f"the conversions alone are {moves * elements / 1e6 / torch_half_ms:.2f}x that")
    return 0


if __name__ == "__main__":
    sys.exit(main())
