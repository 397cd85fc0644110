"""Time PERU-LoRA's SVD of s*B@A by the factor route (QR + r x r core) against the dense route.

The dense route forms the d x d product and runs torch.linalg.svd on it (float32, as a user
would); the factor route is modelstore.kinds.lora.truncated_svd (float64, the default). Both are timed
in the same run and process, so the ratio dense/factor is meaningful on any machine.

    python -m tools.bench_lora_svd            # d = 1024, 2048, 4096; r = 16, 32, 64, 128
    python -m tools.bench_lora_svd --quick    # d = 256, 512, 1024;   r = 8, 16, 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from modelstore.kinds.lora import truncated_svd


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(d: int, r: int, dense_repeats: int, factor_repeats: int) -> tuple[float, float, float]:
    """(factor seconds, dense seconds, max gap between the routes' top-r singular values / largest one)."""
    gen = torch.Generator().manual_seed(d * 1000 + r)
    B = torch.randn(d, r, generator=gen)
    A = torch.randn(r, d, generator=gen) / d**0.5
    s_factor = truncated_svd(B, A, 2.0, rank=r).S  # also warms up the LAPACK paths
    factor = median_time(lambda: truncated_svd(B, A, 2.0, rank=r), factor_repeats)
    results = []
    dense = median_time(lambda: results.append(torch.linalg.svd(2.0 * (B @ A), full_matrices=False)), dense_repeats)
    s_dense = results[-1].S[:r].double()
    gap = float(((s_factor - s_dense).abs() / s_dense[0]).max())
    return factor, dense, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds instead of minutes)")
    parser.add_argument("--dense-repeats", type=int, default=1, help="timed dense SVDs per cell (median)")
    parser.add_argument("--factor-repeats", type=int, default=20, help="timed factor SVDs per cell (median)")
    parser.add_argument("--threads", type=int, help="torch threads (1 gives stable timings on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes, ranks = ((256, 512, 1024), (8, 16, 32)) if args.quick else ((1024, 2048, 4096), (16, 32, 64, 128))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; factor route float64, dense route float32")
    print(f"{'d':>6} {'r':>5} {'factor ms':>10} {'dense ms':>10} {'dense/factor':>13} {'max |dS|/S0':>12}")
    for d in sizes:
        for r in ranks:
            factor, dense, gap = bench(d, r, args.dense_repeats, args.factor_repeats)
            row = f"{d:>6} {r:>5} {factor * 1e3:>10.2f} {dense * 1e3:>10.1f} {dense / factor:>13.0f} {gap:>12.1e}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
