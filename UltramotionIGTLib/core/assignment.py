"""Exact linear assignment (Hungarian / shortest augmenting path) in pure torch, free of host syncs.

The solver is the shortest-augmenting-path method of Jonker & Volgenant in the form of Crouse
(2016), the one scipy's ``linear_sum_assignment`` uses, vectorised over a batch of problems and
written so that **the number of iterations is fixed by the shapes alone**:

* a problem with ``n <= m`` (rows <= columns; otherwise it is transposed) is solved by ``n``
  row augmentations; augmentation ``r`` runs a masked Dijkstra search of exactly ``min(r + 1, m)``
  steps (with ``r`` columns assigned, a search reaches a free column after at most ``r + 1``
  steps), then updates the dual potentials and flips the augmenting path;
* the path is flipped without walking it: columns on the path are found by pointer doubling
  (``ceil(log2(r + 1))`` gather/scatter rounds);
* problems that finished early, padded rows/columns and infeasible problems are masked, never
  branched on. No ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(tensor)``, ``torch.nonzero`` or
  boolean-mask indexing happens inside; the work is ``O(n^2)`` small device kernels per batch,
  whatever the batch size.

Semantics follow `scipy.optimize.linear_sum_assignment`: rectangular in both orientations,
``maximize``, ``+inf`` = forbidden pair (``-inf`` when maximising), NaN / ``-inf`` (``+inf`` when
maximising) = invalid entries, results sorted by row index, ``len == min(n_rows, n_cols)``. Costs
are solved in float64 (scipy's precision) unless told otherwise.

Cost of the fixed bound: ``P (P + 1) / 2`` Dijkstra steps of ~15 small kernels each, P = the
smaller side. That is cheap where this project uses it (tracker: P = detections per frame, ~8;
DETR matching: P = targets per image) and batches for free, but a dense 300x300 problem takes
45,150 sequential steps -- seconds, where scipy needs milliseconds. The win is never stalling the
device queue, not raw speed on big single problems; ``ultramotion-igt bench matcher`` measures it.

Entry points:

* `linear_sum_assignment` -- scipy's contract on device tensors. It makes **one** declared host
  hop after the solve (a status byte) so that it can raise ``ValueError`` like scipy does.
* `batched_linear_sum_assignment` -- B problems of varying sizes (``valid_rows``/``valid_cols``)
  in one call, sync-free: a feasibility flag per problem instead of an exception (B = 1 for one
  matrix).
* `GraphedAssignment` -- the batched solve for one fixed shape captured as a CUDA graph (one
  launch per solve instead of thousands of small kernels).
* `scipy_linear_sum_assignment` -- the reference (host copy + scipy), for comparison/fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from UltramotionIGTLib.core.hostsync import allowed_host_transfer

__all__ = [
    "BatchedAssignment",
    "GraphedAssignment",
    "batched_linear_sum_assignment",
    "linear_sum_assignment",
    "scipy_linear_sum_assignment",
]

#: status codes of a solve (device int8 tensor, one per problem)
STATUS_OK = 0
STATUS_INVALID = 1  # NaN or -inf entries (scipy: "matrix contains invalid numeric entries")
STATUS_INFEASIBLE = 2  # no complete assignment with finite costs (scipy: "cost matrix is infeasible")


class BatchedAssignment(NamedTuple):
    """Result of `batched_linear_sum_assignment`, all on the costs' device.

    rows, cols: BxP int64 (P = min(R, C) of the padded BxRxC input). For problem b the first
    ``count[b]`` entries are its assignment, sorted by row index; the rest are -1. Entries of a
    problem whose ``feasible[b]`` is False are all -1.
    count: B int64, ``min(valid_rows[b], valid_cols[b])``.
    feasible: B bool, False where scipy would raise ``ValueError``.
    status: B int8, `STATUS_OK` / `STATUS_INVALID` / `STATUS_INFEASIBLE`.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    count: torch.Tensor
    feasible: torch.Tensor
    status: torch.Tensor


def _as_device_counts(
    value: torch.Tensor | Sequence[int] | None, batch: int, full: int, device: torch.device
) -> torch.Tensor:
    """B int64 counts on ``device``, without a device-to-host hop (a host list goes up non-blocking)."""
    if value is None:
        return torch.full((batch,), full, dtype=torch.int64, device=device)
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.int64, non_blocking=True).reshape(batch)
    return torch.as_tensor(list(value), dtype=torch.int64).to(device, non_blocking=True).reshape(batch)


def _solve_rows_le_cols(
    cost: torch.Tensor, n_rows: torch.Tensor, n_cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Core solver. cost BxPxQ float, +inf outside each problem's valid block (problem b uses rows
    < n_rows[b] <= n_cols[b] and columns < n_cols[b]).

    Returns (col4row BxP int64, -1 where unassigned; feasible B bool). Fixed iteration count:
    sum_{r<P} min(r+1, Q) Dijkstra steps plus P path flips; every decision stays on the device.
    """
    B, P, Q = cost.shape
    dev, dt = cost.device, cost.dtype
    inf = float("inf")
    ar_q = torch.arange(Q, device=dev)
    row_base = torch.arange(B, device=dev)[:, None] * P
    colvalid = ar_q[None, :] < n_cols[:, None]  # B x Q
    u = torch.zeros(B, P + 1, dtype=dt, device=dev)  # slot P: dummy row
    v = torch.zeros(B, Q, dtype=dt, device=dev)
    col4row = torch.full((B, P + 1), -1, dtype=torch.int64, device=dev)
    row4col = torch.full((B, Q + 1), -1, dtype=torch.int64, device=dev)  # slot Q: dummy column
    feasible = torch.ones(B, dtype=torch.bool, device=dev)
    dummy_col = torch.full((B, 1), Q, dtype=torch.int64, device=dev)
    neg_inf_q = torch.full((B, Q), -inf, dtype=dt, device=dev)
    q_col = torch.full((B, 1), Q, dtype=torch.int64, device=dev)
    ar_q_row = ar_q[None, :]
    # step buffers, reused in place: the hot loop allocates nothing (CPU allocations cost more than
    # these tiny kernels; on CUDA it keeps the caching allocator out of the loop)
    vb = torch.empty(B, Q, dtype=dt, device=dev)
    shortest = torch.empty(B, Q, dtype=dt, device=dev)
    dist = torch.empty(B, Q, dtype=dt, device=dev)
    path = torch.empty(B, Q, dtype=torch.int64, device=dev)
    reduced = torch.empty(B, Q, dtype=dt, device=dev)
    better = torch.empty(B, Q, dtype=torch.bool, device=dev)
    scan = torch.empty(B, Q, dtype=torch.bool, device=dev)
    min_val = torch.empty(B, 1, dtype=dt, device=dev)
    lowest = torch.empty(B, 1, dtype=dt, device=dev)
    j = torch.empty(B, 1, dtype=torch.int64, device=dev)
    i_cur = torch.empty(B, 1, dtype=torch.int64, device=dev)
    flat_row = torch.empty(B, 1, dtype=torch.int64, device=dev)
    searching = torch.empty(B, 1, dtype=torch.bool, device=dev)
    few = B <= 4
    i_cur_rows = i_cur[:, :, None].expand(B, 1, Q)  # a view: follows i_cur's in-place updates
    reduced3 = reduced.view(B, 1, Q)

    for r in range(P):
        active = feasible & (n_rows > r)  # this problem augments row r now
        # reduced row costs c[i, j] - u[i]; the step subtracts v[j] (-inf blocks scanned/padded columns)
        cmu3 = cost - u[:, :P, None]
        cmu = cmu3.view(B * P, Q)
        torch.where(colvalid, v, neg_inf_q, out=vb)
        shortest.fill_(inf)
        dist.zero_()
        path.fill_(P)
        i_cur.fill_(r)
        min_val.zero_()
        searching.copy_(active[:, None])
        steps = min(r + 1, Q)
        for _ in range(steps):
            # one Dijkstra step for every problem at once (finished ones are masked through `searching`)
            if few:  # gather through a view of i_cur (no index arithmetic); index_select wins for big B
                torch.gather(cmu3, 1, i_cur_rows, out=reduced3)
            else:
                torch.add(row_base, i_cur, out=flat_row)
                torch.index_select(cmu, 0, flat_row.view(-1), out=reduced)
            reduced.sub_(vb).add_(min_val)
            torch.lt(reduced, shortest, out=better)
            torch.minimum(shortest, reduced, out=shortest)
            torch.where(better, i_cur, path, out=path)
            torch.min(shortest, dim=1, keepdim=True, out=(lowest, j))
            # a search that ended scans nothing (Q); one that met lowest == inf is infeasible, and every
            # later distance of it stays inf, so its "sink" is rejected below (dist < inf)
            torch.where(searching, j, q_col, out=j)
            torch.eq(ar_q_row, j, out=scan)
            vb.masked_fill_(scan, -inf)
            torch.where(scan, lowest, dist, out=dist)
            shortest.masked_fill_(scan, inf)
            torch.gather(row4col, 1, j, out=i_cur)  # -1: free column reached (the sink) or nothing scanned
            torch.ge(i_cur, 0, out=searching)
            i_cur.clamp_(min=0)
            min_val, lowest = lowest, min_val  # swap buffers: the next step's base distance

        scanned = colvalid & (vb == -inf)  # SC
        free = row4col[:, :Q] < 0
        sink_mask = scanned & free & (dist < inf)  # at most one: the search stops at the first free one
        found = sink_mask.any(dim=1)
        feasible = feasible & (found | ~active)
        done = active & found
        sink = torch.where(done, sink_mask.to(torch.int8).argmax(dim=1), Q)
        min_val = dist.gather(1, sink.clamp(max=Q - 1)[:, None])
        scanned = scanned & done[:, None]
        # dual update: v[j] -= minVal - d[j] (j in SC); u[row4col[j]] += minVal - d[j] (assigned j in SC)
        delta = torch.where(scanned, min_val - dist, 0.0)
        v = v - delta
        assigned_sc = scanned & ~free
        u = u.scatter_add(
            1, torch.where(assigned_sc, row4col[:, :Q], P), torch.where(assigned_sc, delta, 0.0)
        )
        u[:, r] += torch.where(done, min_val[:, 0], 0.0)

        # flip the augmenting path sink -> ... -> row r. nxt[j]: the column that row path[j] held before.
        prev_col = col4row.gather(1, path)
        nxt = torch.where(scanned & (prev_col >= 0), prev_col, Q)
        nxt = torch.cat((nxt, dummy_col), dim=1)  # B x (Q+1), dummy column Q points to itself
        on = (torch.arange(Q + 1, device=dev)[None, :] == sink[:, None]).to(torch.int32)
        for _ in range((steps - 1).bit_length()):  # pointer doubling covers paths of <= steps columns
            on = on | torch.zeros_like(on).scatter_add(1, nxt, on).clamp(max=1)
            nxt = nxt.gather(1, nxt)
        on_path = (on[:, :Q] > 0) & scanned
        row4col = torch.cat((torch.where(on_path, path, row4col[:, :Q]), row4col[:, Q:]), dim=1)
        col4row = col4row.scatter(1, torch.where(on_path, path, P), ar_q.expand(B, Q))

    return col4row[:, :P], feasible


def batched_linear_sum_assignment(
    costs: torch.Tensor,
    valid_rows: torch.Tensor | Sequence[int] | None = None,
    valid_cols: torch.Tensor | Sequence[int] | None = None,
    maximize: bool = False,
    dtype: torch.dtype = torch.float64,
) -> BatchedAssignment:
    """Solve B rectangular assignment problems at once, without a host sync.

    costs: BxRxC (any real dtype, any device); problem b is ``costs[b, :valid_rows[b], :valid_cols[b]]``
    (the padding is ignored, whatever it holds). ``valid_rows``/``valid_cols``: B int tensor on any
    device, a host sequence of ints, or None (= R / C). Each problem may be taller or wider than
    wide: it is transposed on the device where needed. ``maximize``: as in scipy. ``dtype``: the
    solve precision (float64 = scipy's).

    Returns a `BatchedAssignment` on ``costs.device``. Work: ``P(P+1)/2`` masked Dijkstra steps
    with P = min(R, C) (a fixed count, independent of the data) over BxQ tensors, Q = max(R, C).
    """
    if costs.dim() != 3:
        raise ValueError(f"costs must be BxRxC, got shape {tuple(costs.shape)}")
    B, R, C = costs.shape
    dev = costs.device
    P, Q = min(R, C), max(R, C)
    n_rows = _as_device_counts(valid_rows, B, R, dev).clamp(0, R)
    n_cols = _as_device_counts(valid_cols, B, C, dev).clamp(0, C)
    work = costs.to(dtype)
    if maximize:
        work = -work
    inside = (torch.arange(R, device=dev)[None, :, None] < n_rows[:, None, None]) & (
        torch.arange(C, device=dev)[None, None, :] < n_cols[:, None, None]
    )
    invalid = ((torch.isnan(work) | (work == float("-inf"))) & inside).flatten(1).any(dim=1)
    work = torch.where(inside, work, float("inf"))  # padding: whatever it held, never a candidate

    transposed = n_rows > n_cols  # per problem: solve the transpose so rows <= cols
    if valid_rows is None and valid_cols is None:  # static shapes decide: no per-problem select
        if R > C:
            work = work.transpose(1, 2)
    else:
        S = Q
        square = F.pad(work, (0, S - C, 0, S - R), value=float("inf"))
        work = torch.where(transposed[:, None, None], square.transpose(1, 2), square)[:, :P, :Q]
    nr = torch.where(transposed, n_cols, n_rows)
    nc = torch.where(transposed, n_rows, n_cols)

    if P == 0 or B == 0:
        col4row = torch.full((B, P), -1, dtype=torch.int64, device=dev)
        feasible = torch.ones(B, dtype=torch.bool, device=dev)
    else:
        col4row, feasible = _solve_rows_le_cols(work.contiguous(), nr, nc)
    ok = feasible & ~invalid
    status = torch.where(
        invalid,
        torch.full_like(n_rows, STATUS_INVALID),
        torch.where(feasible, torch.full_like(n_rows, STATUS_OK), torch.full_like(n_rows, STATUS_INFEASIBLE)),
    ).to(torch.int8)

    slot = torch.arange(P, device=dev).expand(B, P)
    used = (slot < nr[:, None]) & ok[:, None]
    orig_row = torch.where(transposed[:, None], col4row, slot)
    orig_col = torch.where(transposed[:, None], slot, col4row)
    # sort the pairs by original row without torch.sort: mark the matched rows, compact them by cumsum
    row_slot = torch.where(used, orig_row, R)  # R: dummy
    has = torch.zeros(B, R + 1, dtype=torch.int64, device=dev).scatter(1, row_slot, 1)[:, :R]
    partner = torch.full((B, R + 1), -1, dtype=torch.int64, device=dev).scatter(1, row_slot, orig_col)[:, :R]
    target = torch.where(has > 0, torch.cumsum(has, dim=1) - 1, P)  # P: dummy
    empty = torch.full((B, P + 1), -1, dtype=torch.int64, device=dev)
    rows = empty.scatter(1, target, torch.arange(R, device=dev).expand(B, R))[:, :P]
    cols = empty.scatter(1, target, partner)[:, :P]
    return BatchedAssignment(rows, cols, torch.minimum(n_rows, n_cols), ok, status)


class GraphedAssignment:
    """`batched_linear_sum_assignment` for one fixed BxRxC shape, captured once as a CUDA graph.

    The solver's fixed iteration count is what makes it capturable: the ~``15 P (P + 1) / 2`` small
    kernels of a solve become one graph launch. ``solver = GraphedAssignment(B, R, C)`` captures
    (the capture synchronises once); ``solver(costs, valid_rows=None, valid_cols=None)`` copies
    the inputs into the graph's static buffers, replays it and returns a `BatchedAssignment` of
    fresh tensors -- no host sync per call. CUDA only.
    """

    def __init__(
        self,
        batch: int,
        rows: int,
        cols: int,
        device: str | torch.device = "cuda",
        maximize: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(
                f"GraphedAssignment needs a CUDA device, got {dev}: use batched_linear_sum_assignment"
            )
        self.shape = (batch, rows, cols)
        self._costs = torch.zeros(batch, rows, cols, dtype=dtype, device=dev)
        self._rows = torch.full((batch,), rows, dtype=torch.int64, device=dev)
        self._cols = torch.full((batch,), cols, dtype=torch.int64, device=dev)

        def solve() -> BatchedAssignment:
            return batched_linear_sum_assignment(self._costs, self._rows, self._cols, maximize, dtype)

        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
            solve()
        torch.cuda.current_stream(dev).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = solve()

    def __call__(
        self,
        costs: torch.Tensor,
        valid_rows: torch.Tensor | Sequence[int] | None = None,
        valid_cols: torch.Tensor | Sequence[int] | None = None,
    ) -> BatchedAssignment:
        """costs: BxRxC on the graph's device (same shape as captured); counts as in the batched call."""
        if tuple(costs.shape) != self.shape:
            raise ValueError(f"GraphedAssignment was captured for {self.shape}, got {tuple(costs.shape)}")
        batch, rows, cols = self.shape
        self._costs.copy_(costs)
        self._rows.copy_(_as_device_counts(valid_rows, batch, rows, self._rows.device))
        self._cols.copy_(_as_device_counts(valid_cols, batch, cols, self._cols.device))
        self._graph.replay()
        return BatchedAssignment(*(t.clone() for t in self._out))


def linear_sum_assignment(
    cost: torch.Tensor, maximize: bool = False, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for `scipy.optimize.linear_sum_assignment` on device tensors.

    cost: RxC (any real dtype, CPU or CUDA). Returns (row_ind, col_ind): int64 tensors of length
    min(R, C) on ``cost.device``, sorted by row index, minimising (or maximising) the total cost.
    ``inf`` marks forbidden pairs. Raises ``ValueError`` exactly where scipy does (infeasible
    matrix; NaN or -inf entries, +inf when maximising; not 2-D).

    Host hops: exactly one, declared (``allowed_host_transfer``), after the solve -- reading the
    status byte that decides whether to raise. Use `batched_linear_sum_assignment` (a feasibility
    flag instead of an exception) where even that must not happen.
    """
    if not isinstance(cost, torch.Tensor):
        cost = torch.as_tensor(cost)
    if cost.dim() != 2:
        raise ValueError(f"expected a matrix (2-D tensor), got a {cost.dim()}-D tensor")
    res = batched_linear_sum_assignment(cost[None], maximize=maximize, dtype=dtype)
    with allowed_host_transfer("linear_sum_assignment status check", max_syncs=1):
        status = int(res.status[0])
    if status == STATUS_INVALID:
        raise ValueError("matrix contains invalid numeric entries")
    if status == STATUS_INFEASIBLE:
        raise ValueError("cost matrix is infeasible")
    return res.rows[0], res.cols[0]


def scipy_linear_sum_assignment(
    cost: torch.Tensor, maximize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference/fallback: copy ``cost`` (RxC) to the host, run scipy, return int64 tensors on ``cost.device``.

    Raises scipy's ``ValueError`` on infeasible or invalid input. Three declared transfers (the copy
    down and the two result uploads).
    """
    from scipy.optimize import linear_sum_assignment as _scipy_lsa

    with allowed_host_transfer("scipy_linear_sum_assignment", max_syncs=3):
        host = cost.detach().to("cpu", torch.float64).numpy()
        rows, cols = _scipy_lsa(host, maximize=maximize)
        return (
            torch.as_tensor(rows, dtype=torch.int64).to(cost.device),
            torch.as_tensor(cols, dtype=torch.int64).to(cost.device),
        )
