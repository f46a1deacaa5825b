"""``ultramotion-igt bench matcher``: the torch assignment solver vs scipy, side by side in one run.

For each case (300x10, 300x300, 32 x (300x10) by default) the same random float costs, resident on
``--device``, are solved by

* ``torch``: `batched_linear_sum_assignment` on the device (sync-free; the clock stops after a
  ``torch.cuda.synchronize()`` so the device work is counted),
* ``graph`` (CUDA only): the same solve captured once as a CUDA graph (`GraphedAssignment`) and
  replayed per call (inputs copied into its static buffers), and
* ``scipy``: what a CPU matcher has to do with device-resident costs -- copy them to the host,
  run ``scipy.optimize.linear_sum_assignment`` per problem, and put the indices back on the device.

It prints median wall times over ``--repeats`` runs (after one warm-up), the ratio scipy/torch
(> 1: torch is faster) and checks that both totals agree. Nothing here is asserted on timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from UltramotionIGTLib.core.assignment import GraphedAssignment, batched_linear_sum_assignment
from UltramotionIGTLib.core.device import resolve_device
from UltramotionIGTLib.core.hostsync import allowed_host_transfer

CASES: dict[str, tuple[int, int, int]] = {  # name -> (batch, rows, cols)
    "300x10": (1, 300, 10),
    "300x300": (1, 300, 300),
    "32x(300x10)": (32, 300, 10),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up (allocator, kernels, scipy import)
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _scipy_solve(costs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from scipy.optimize import linear_sum_assignment

    with allowed_host_transfer("bench matcher: scipy baseline", max_syncs=1):
        host = costs.cpu().numpy()  # the device-to-host copy the CPU matcher needs
    out = []
    for c in host:
        r, k = linear_sum_assignment(c)
        out.append((torch.as_tensor(r).to(costs.device), torch.as_tensor(k).to(costs.device)))
    return out


def run_case(name: str, device: torch.device, repeats: int, seed: int = 0) -> dict[str, float | str]:
    """Time one case; returns {case, torch_ms, scipy_ms, ratio, max_total_diff}."""
    batch, rows, cols = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    costs = torch.rand(batch, rows, cols, generator=gen, dtype=torch.float64).to(device)
    t_torch, res = _time(lambda: batched_linear_sum_assignment(costs), device, repeats)
    t_graph = float("nan")
    if device.type == "cuda":  # the same solve captured once as a CUDA graph, replayed per call
        solver = GraphedAssignment(batch, rows, cols, device=device)
        t_graph, res_graph = _time(lambda: solver(costs), device, repeats)
        if not (torch.equal(res_graph.rows, res.rows) and torch.equal(res_graph.cols, res.cols)):
            print(f"warning: {name}: CUDA-graph replay differs from the eager solve")
    t_scipy, ref = _time(lambda: _scipy_solve(costs), device, repeats)
    host = costs.cpu().numpy()
    k = min(rows, cols)
    r_t, c_t = res.rows.cpu().numpy(), res.cols.cpu().numpy()
    diff = 0.0
    for b in range(batch):
        ours = float(host[b][r_t[b, :k], c_t[b, :k]].sum())
        r_s, c_s = (x.cpu().numpy() for x in ref[b])
        diff = max(diff, abs(ours - float(host[b][r_s, c_s].sum())))
    return {
        "case": name,
        "torch_ms": t_torch * 1e3,
        "scipy_ms": t_scipy * 1e3,
        "ratio": t_scipy / t_torch,
        "graph_ms": t_graph * 1e3,
        "graph_ratio": t_scipy / t_graph,
        "max_total_diff": diff,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def configure(parser: argparse.ArgumentParser) -> None:
    from UltramotionIGTLib.tools.options import add_device_argument, describe_from_doc, positive_int

    describe_from_doc(parser, __doc__)
    add_device_argument(parser)
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        metavar="N",
        help="timed runs per case, the median is reported (default 5)",
    )
    parser.add_argument(
        "--cases", nargs="+", choices=list(CASES), default=list(CASES), help="which cases (default: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random costs (default 0)")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    print(
        f"matcher benchmark on {device} = {_device_name(device)}, torch {torch.__version__}, "
        f"median of {args.repeats} runs"
    )
    print(
        "torch: batched_linear_sum_assignment on the device, float64, no host sync (synchronised to time it)"
    )
    print("graph: the same solve captured once as a CUDA graph and replayed (CUDA only)")
    print("scipy: device-to-host copy + scipy.optimize.linear_sum_assignment per problem + indices back\n")
    header = (
        f"{'case':<13} {'torch ms':>10} {'graph ms':>10} {'scipy ms':>10} {'scipy/torch':>12} "
        f"{'scipy/graph':>12} {'|total diff|':>13}"
    )
    print(header)
    print("-" * len(header))
    for name in args.cases:
        row = run_case(name, device, args.repeats, args.seed)
        print(
            f"{row['case']:<13} {row['torch_ms']:>10.2f} {row['graph_ms']:>10.2f} {row['scipy_ms']:>10.2f} "
            f"{row['ratio']:>12.3f} {row['graph_ratio']:>12.3f} {row['max_total_diff']:>13.2e}"
        )
    return 0
