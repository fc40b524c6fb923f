"""Forward + backward time of one 384 x 384 layer at 2048 tokens: dense vs SVDLinear vs Householder (SVDP) vs STTP.

    python benchmarks/householder_speed.py                  # one thread, ranks 384 and 64
    python benchmarks/householder_speed.py --tokens 512 --ranks 384 128

Each step is `y = layer(x)`, `(y * g).sum().backward()` with an input that needs a gradient (as inside a network).
SVDLinear is timed with and without its orthogonality term (the Householder layers need none), computed in forward
as under SVDTrainer. Variants alternate in rounds so machine noise hits all alike; the table gives the median
process CPU time per step (with one thread, the work itself even on a shared machine) and its ratio to dense.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from hf_svd_compress import HouseholderSVDLinear, SVDLinear


def variants(width: int, ranks: list[int], tt_max_rank: int) -> dict[str, Callable[[], nn.Module]]:
    torch.manual_seed(0)
    dense = nn.Linear(width, width)
    built: dict[str, Callable[[], nn.Module]] = {"dense": lambda: dense}
    for r in ranks:
        built[f"svd r={r}"] = lambda r=r: SVDLinear.from_linear(dense, max_rank=r)
        built[f"svd+orth r={r}"] = lambda r=r: _with_orth(SVDLinear.from_linear(dense, max_rank=r))
        built[f"householder r={r}"] = lambda r=r: HouseholderSVDLinear.from_linear(dense, max_rank=r)
        built[f"sttp r={r}"] = lambda r=r: HouseholderSVDLinear.from_linear(dense, max_rank=r, parameterization="sttp")
        built[f"sttp r={r} cap={tt_max_rank}"] = lambda r=r: HouseholderSVDLinear.from_linear(
            dense, max_rank=r, parameterization="sttp", tt_max_rank=tt_max_rank
        )
    return built


def _with_orth(layer: SVDLinear) -> SVDLinear:
    layer.orth_enabled = True
    return layer


def step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    start = time.process_time()
    y = layer(x)
    loss = (y * g).sum()
    for orth, _ in getattr(layer, "regularizer_terms", []):
        loss = loss + orth
    loss.backward()
    if hasattr(layer, "regularizer_terms"):
        layer.regularizer_terms.clear()
    elapsed = time.process_time() - start
    layer.zero_grad(set_to_none=True)
    x.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ranks", type=int, nargs="+", default=[384, 64])
    parser.add_argument("--tt_max_rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = {name: build().train() for name, build in variants(args.width, args.ranks, args.tt_max_rank).items()}
    x = torch.randn(args.tokens, args.width, requires_grad=True)
    g = torch.randn(args.tokens, args.width)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for round_ in range(args.rounds + 2):
        for name, layer in layers.items():
            elapsed = step(layer, x, g)
            if round_ >= 2:  # warm-up rounds
                times[name].append(elapsed)
    base = statistics.median(times["dense"])
    print(f"{args.width} x {args.width} layer, {args.tokens} tokens, {args.threads} thread(s), fwd+bwd CPU time")
    print(f"{'variant':<24} {'ms':>8} {'vs dense':>9} {'weight DOF':>11}")
    for name, layer in layers.items():
        median = statistics.median(times[name])
        dof = getattr(layer, "dof", sum(p.numel() for n, p in layer.named_parameters() if n != "bias"))
        print(f"{name:<24} {1000 * median:8.2f} {median / base:8.2f}x {dof:11d}")


if __name__ == "__main__":
    main()
