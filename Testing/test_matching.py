"""The torch assignment solver against scipy, its host-sync freedom, and the DETR/D-FINE matcher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from UltramotionIGTLib.core.assignment import (
    STATUS_INFEASIBLE,
    STATUS_INVALID,
    batched_linear_sum_assignment,
    linear_sum_assignment,
    scipy_linear_sum_assignment,
)
from UltramotionIGTLib.tools.training.matcher import DFineCriterion, HungarianMatcher

KINDS = ("ties", "int", "float", "huge", "forbidden")


def _instance(rng: np.random.Generator, nr: int, nc: int, kind: str, maximize: bool) -> np.ndarray:
    if kind == "ties":  # integer costs with many ties
        c = rng.integers(0, 4, (nr, nc)).astype(np.float64)
    elif kind == "int":
        c = rng.integers(-50, 51, (nr, nc)).astype(np.float64)
    elif kind == "float":
        c = rng.normal(0.0, 1.0, (nr, nc))
    elif kind == "huge":  # very large and negative values, with ties at the 1e9 scale
        c = rng.integers(-3, 4, (nr, nc)) * 1e9 + rng.integers(0, 3, (nr, nc)) * rng.random() * 10
    else:  # forbidden pairs at several densities: some instances are infeasible
        c = rng.random((nr, nc)) * 10
        c[rng.random((nr, nc)) < rng.choice([0.2, 0.5, 0.8])] = -np.inf if maximize else np.inf
    return c


def _make_instances(rng: np.random.Generator, count: int, dims, maximize_share: float = 0.25):
    out = []
    for _ in range(count):
        nr, nc = (int(x) for x in dims(rng))
        maximize = bool(rng.random() < maximize_share)
        kind = KINDS[int(rng.integers(len(KINDS)))]
        out.append((_instance(rng, nr, nc, kind, maximize), maximize))
    return out


def _total(c: np.ndarray, rows, cols) -> float:
    return math.fsum(float(x) for x in c[np.asarray(rows), np.asarray(cols)])


def _check_batch(instances, pad_rows: int, pad_cols: int, maximize: bool) -> int:
    """Solve ``instances`` (all with the same maximize flag) in one batched call; compare with scipy."""
    B = len(instances)
    padded = np.full((B, pad_rows, pad_cols), np.nan)  # padding must be ignored, whatever it holds
    nrs, ncs = [], []
    for b, (c, _) in enumerate(instances):
        padded[b, : c.shape[0], : c.shape[1]] = c
        nrs.append(c.shape[0])
        ncs.append(c.shape[1])
    res = batched_linear_sum_assignment(
        torch.from_numpy(padded), torch.tensor(nrs), torch.tensor(ncs), maximize=maximize
    )
    rows, cols, count, feasible = (t.numpy() for t in res[:4])
    for b, (c, _) in enumerate(instances):
        nr, nc = c.shape
        assert count[b] == min(nr, nc)
        try:
            r_ref, c_ref = scipy_lsa(c, maximize=maximize)
        except ValueError:
            assert not feasible[b], f"scipy: infeasible, ours: feasible ({nr}x{nc}, maximize={maximize})\n{c}"
            assert (rows[b] == -1).all() and (cols[b] == -1).all()
            continue
        assert feasible[b], f"scipy: feasible, ours: infeasible ({nr}x{nc}, maximize={maximize})\n{c}"
        k = min(nr, nc)
        r, k_cols = rows[b, :k], cols[b, :k]
        assert (rows[b, k:] == -1).all() and (cols[b, k:] == -1).all()
        assert (np.diff(r) > 0).all() and r.min() >= 0 and r.max() < nr  # sorted by row, distinct
        assert len(set(k_cols.tolist())) == k and k_cols.min() >= 0 and k_cols.max() < nc
        assert np.isfinite(c[r, k_cols]).all(), "a forbidden pair was assigned"
        ours, ref = _total(c, r, k_cols), _total(c, r_ref, c_ref)
        assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref)), f"{nr}x{nc} max={maximize}: {ours} vs {ref}"
    return B


def test_ten_thousand_random_instances_match_scipy():
    """>= 10,000 instances, sizes 1..300, both orientations, ties, 1e9 / negative values, inf, maximize."""
    rng = np.random.default_rng(20261123)
    groups = [
        # (count, dims, pad_rows, pad_cols): mixed orientations inside each padded batch
        (8010, lambda g: g.integers(1, 13, 2), 12, 12),
        (1400, lambda g: g.integers(1, 41, 2), 40, 40),
        (350, lambda g: g.integers(1, 101, 2), 100, 100),
        (120, lambda g: (g.integers(13, 301), g.integers(1, 13)), 300, 12),  # tall (300x10-like)
        (120, lambda g: (g.integers(1, 13), g.integers(13, 301)), 12, 300),  # wide
    ]
    checked = 0
    for count, dims, pr, pc in groups:
        instances = _make_instances(rng, count, dims)
        for maximize in (False, True):
            part = [inst for inst in instances if inst[1] == maximize]
            checked += _check_batch(part, pr, pc, maximize)
    # a few large square-ish problems (the expensive ones: 300*301/2 fixed Dijkstra steps)
    large = [
        (_instance(rng, n, m, kind, False), False)
        for (n, m), kind in zip(
            [(300, 300), (300, 260), (240, 300), (280, 280)],
            ("float", "ties", "huge", "forbidden"),
            strict=True,
        )
    ]
    checked += _check_batch(large, 300, 300, False)
    assert checked >= 10_000


def test_public_function_matches_scipy_including_errors():
    rng = np.random.default_rng(7)
    instances = _make_instances(rng, 300, lambda g: g.integers(1, 9, 2), maximize_share=0.4)
    raised = 0
    for c, maximize in instances:
        try:
            r_ref, c_ref = scipy_lsa(c, maximize=maximize)
        except ValueError:
            with pytest.raises(ValueError):
                linear_sum_assignment(torch.from_numpy(c), maximize=maximize)
            raised += 1
            continue
        rows, cols = linear_sum_assignment(torch.from_numpy(c).to(torch.float32), maximize=maximize)
        assert rows.dtype == cols.dtype == torch.int64
        assert rows.tolist() == sorted(rows.tolist()) and len(rows) == min(c.shape)
        # float32 input: scipy sees the same float32 values widened to float64
        c32 = c.astype(np.float32).astype(np.float64)
        r32, k32 = scipy_lsa(c32, maximize=maximize)
        ref = _total(c32, r32, k32)
        assert abs(_total(c32, rows.numpy(), cols.numpy()) - ref) <= 1e-6 * max(1.0, abs(ref))
    assert raised > 0  # the generator produced infeasible instances, and both sides raised


@pytest.mark.parametrize(
    "matrix, maximize",
    [
        ([[1.0, np.nan], [2.0, 3.0]], False),
        ([[1.0, -np.inf], [2.0, 3.0]], False),
        ([[1.0, np.inf], [2.0, 3.0]], True),  # +inf is invalid when maximising (it becomes -inf)
        ([[np.inf, np.inf], [1.0, 2.0]], False),  # infeasible: row 0 has no allowed column
        ([[np.inf, 1.0, np.inf], [np.inf, 2.0, np.inf]], False),  # both rows need column 1
        ([[1.0, 2.0, 3.0]], False),  # fine, wide
        (np.zeros((0, 4)), False),  # empty
        ([1.0, 2.0], False),  # not a matrix
        (np.zeros((2, 2, 2)), False),
    ],
)
def test_edge_cases_behave_like_scipy(matrix, maximize):
    c = np.asarray(matrix, dtype=np.float64)
    try:
        r_ref, c_ref = scipy_lsa(c, maximize=maximize)
    except ValueError as scipy_error:
        with pytest.raises(ValueError) as ours:
            linear_sum_assignment(torch.from_numpy(c), maximize=maximize)
        if c.ndim == 2:
            assert str(ours.value) == str(scipy_error)  # same wording as scipy for 2-D input
            res = batched_linear_sum_assignment(torch.from_numpy(c)[None], maximize=maximize)
            assert not bool(res.feasible[0])
        return
    rows, cols = linear_sum_assignment(torch.from_numpy(c), maximize=maximize)
    assert rows.tolist() == list(r_ref) and len(cols) == len(c_ref)
    assert _total(c, rows.numpy(), cols.numpy()) == pytest.approx(_total(c, r_ref, c_ref))


def test_status_distinguishes_invalid_from_infeasible():
    c = torch.tensor(
        [[[1.0, float("nan")], [2.0, 3.0]], [[float("inf")] * 2, [1.0, 2.0]], [[1.0, 2.0], [3.0, 0.5]]]
    )
    res = batched_linear_sum_assignment(c)
    assert res.status.tolist() == [STATUS_INVALID, STATUS_INFEASIBLE, 0]
    assert res.feasible.tolist() == [False, False, True]
    assert res.rows[2].tolist() == [0, 1] and res.cols[2].tolist() == [0, 1]


def test_scipy_fallback_returns_device_tensors():
    c = torch.rand(5, 7)
    rows, cols = scipy_linear_sum_assignment(c)
    ours_r, ours_c = linear_sum_assignment(c)
    assert rows.device == c.device and rows.dtype == torch.int64
    assert torch.isclose(c[rows, cols].sum(), c[ours_r, ours_c].sum())


# --- host hops -----------------------------------------------------------------------------------


def test_counter_sees_host_hops(host_hops):
    """The counter is live: an ordinary sync is counted."""
    t = torch.ones(3)
    with host_hops() as hops:
        bool(t.sum() > 0)
        t.tolist()
    assert hops.undeclared == {"bool": 1, "tolist": 1}, hops


def test_sync_free_entry_points_make_no_host_hop(host_hops):
    rng = np.random.default_rng(3)
    c = rng.random((30, 50))
    c[rng.random(c.shape) < 0.3] = np.inf
    single = torch.from_numpy(c)
    batch = torch.from_numpy(rng.random((6, 20, 9)))
    n_rows = torch.tensor([20, 3, 9, 1, 15, 20])
    n_cols = torch.tensor([9, 9, 2, 9, 7, 1])
    with host_hops(single, batch) as hops:  # the cost matrices live on the device
        one = batched_linear_sum_assignment(single[None])
        res = batched_linear_sum_assignment(batch, n_rows, n_cols, maximize=True)
    assert hops.events == [], f"host hops inside the solver: {hops}"
    assert one.rows.shape == (1, 30) and res.rows.shape == (6, 9)
    assert bool(one.feasible[0]) == _scipy_ok(c)


def test_public_function_makes_exactly_one_declared_hop(host_hops):
    c = torch.rand(8, 8)
    with host_hops() as hops:
        linear_sum_assignment(c)
    assert hops.undeclared == {}, hops
    assert hops.declared == {"linear_sum_assignment status check": 1}
    assert [e.category for e in hops.events] == ["int"]


def _scipy_ok(c: np.ndarray) -> bool:
    try:
        scipy_lsa(c)
    except ValueError:
        return False
    return True


@pytest.mark.gpu
def test_cuda_solve_without_sync_and_equal_to_scipy():
    rng = np.random.default_rng(11)
    costs = [rng.random((300, 10)), rng.integers(0, 5, (40, 60)).astype(float), rng.random((64, 64))]
    for c in costs:
        dev = torch.from_numpy(c).cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            one = batched_linear_sum_assignment(dev[None])
            res = batched_linear_sum_assignment(torch.stack([dev, dev.flip(0)]), maximize=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rows, cols = one.rows[0, : min(c.shape)], one.cols[0, : min(c.shape)]
        assert rows.is_cuda and bool(one.feasible[0])
        r_ref, c_ref = scipy_lsa(c)
        assert _total(c, rows.cpu().numpy(), cols.cpu().numpy()) == pytest.approx(
            _total(c, r_ref, c_ref), rel=1e-9
        )
        r_ref, c_ref = scipy_lsa(c, maximize=True)
        k = min(c.shape)
        got = _total(c, res.rows[0, :k].cpu().numpy(), res.cols[0, :k].cpu().numpy())
        assert got == pytest.approx(_total(c, r_ref, c_ref), rel=1e-9)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_solve_without_sync():
    from UltramotionIGTLib.core.assignment import GraphedAssignment

    rng = np.random.default_rng(12)
    solver = GraphedAssignment(4, 30, 12, device="cuda")  # the capture synchronises once, here
    for _ in range(3):
        costs = torch.from_numpy(rng.integers(0, 6, (4, 30, 12)).astype(np.float64)).cuda()
        n_rows = torch.tensor([30, 5, 12, 1], device="cuda")
        n_cols = torch.tensor([12, 12, 7, 3], device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = solver(costs, n_rows, n_cols)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want = batched_linear_sum_assignment(costs, n_rows, n_cols)
        assert torch.equal(got.rows, want.rows) and torch.equal(got.cols, want.cols)
        assert torch.equal(got.feasible, want.feasible)


# --- the DETR / D-FINE matcher ---------------------------------------------------------------------


def _detr_batch(rng: torch.Generator, bs: int, nq: int, nc: int, sizes: list[int]):
    outputs = {
        "logits": torch.randn(bs, nq, nc, generator=rng),
        "pred_boxes": torch.rand(bs, nq, 4, generator=rng) * 0.5 + 0.1,
    }
    targets = [
        {
            "class_labels": torch.randint(0, nc, (t,), generator=rng),
            "boxes": torch.rand(t, 4, generator=rng) * 0.5 + 0.1,
        }
        for t in sizes
    ]
    return outputs, targets


@pytest.mark.parametrize("use_focal_loss", [True, False])
def test_matcher_same_total_cost_as_scipy(use_focal_loss):
    g = torch.Generator().manual_seed(5)
    gpu = HungarianMatcher(use_focal_loss=use_focal_loss, use_gpu_match=True)
    ref = HungarianMatcher(use_focal_loss=use_focal_loss, use_gpu_match=False)
    for _ in range(20):
        nq = int(torch.randint(1, 40, (1,), generator=g))
        sizes = [int(x) for x in torch.randint(0, 50, (4,), generator=g)]
        outputs, targets = _detr_batch(g, 4, nq, 3, sizes)
        cost = gpu.cost_matrix(outputs, targets).split(sizes, -1) if sum(sizes) else None
        ours, theirs = gpu(outputs, targets), ref(outputs, targets)
        for b, ((i, j), (i_ref, j_ref), t) in enumerate(zip(ours, theirs, sizes, strict=True)):
            assert len(i) == len(j) == min(nq, t) and i.dtype == j.dtype == torch.int64
            assert i.tolist() == sorted(i.tolist())
            if t:
                c = cost[b][b].double()
                assert c[i, j].sum() == pytest.approx(float(c[i_ref, j_ref].sum()), rel=1e-6)


def test_matcher_agrees_with_transformers_and_swaps_into_its_loss():
    transformers = pytest.importorskip("transformers")
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher, RTDetrLoss

    config = transformers.RTDetrConfig(num_labels=3)
    g = torch.Generator().manual_seed(9)
    outputs, targets = _detr_batch(g, 3, 30, 3, [4, 0, 12])
    ours = HungarianMatcher.from_config(config)
    theirs = RTDetrHungarianMatcher(config)
    for (i, j), (i_ref, j_ref) in zip(ours(outputs, targets), theirs(outputs, targets), strict=True):
        # continuous random costs: the optimum is unique, so the indices themselves agree
        assert i.tolist() == i_ref.tolist() and j.tolist() == j_ref.tolist()

    criterion = RTDetrLoss(config)
    loss_ref = criterion(outputs, targets)
    criterion.matcher = ours
    loss_ours = criterion(outputs, targets)
    assert loss_ref.keys() == loss_ours.keys()
    for key in loss_ref:
        assert torch.allclose(loss_ref[key], loss_ours[key]), key


@pytest.mark.parametrize("training", [False, True])
def test_dfine_criterion_is_transformers_loss_with_our_matcher(monkeypatch, training):
    """A real (tiny) transformers D-FINE: `DFineCriterion` on the inner model's outputs gives the terms
    ``model(labels=...)`` computes with transformers' own matcher (in training also the denoising
    terms), through our matcher, and leaves transformers' module globals alone."""
    transformers = pytest.importorskip("transformers")
    from transformers.loss import loss_d_fine

    from UltramotionIGTLib.core.detector import small_dfine_config

    calls = []
    original_forward = HungarianMatcher.forward

    def counted(self, outputs, targets):
        calls.append(len(targets))
        return original_forward(self, outputs, targets)

    monkeypatch.setattr(HungarianMatcher, "forward", counted)
    original_matcher = loss_d_fine.RTDetrHungarianMatcher
    torch.manual_seed(0)
    config = small_dfine_config(image_size=64, num_queries=10)
    model = transformers.DFineForObjectDetection(config).train(training)
    criterion = DFineCriterion(config, "cpu")
    pixels = torch.rand(2, 3, 64, 64)
    labels = [
        {
            "class_labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.1, 0.4]]),
        },
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
    ]
    with torch.no_grad():
        torch.manual_seed(1)  # the denoising queries are random: the same draw for both
        reference = model(pixel_values=pixels, labels=labels)
        assert not calls, "transformers' own loss must not use our matcher"
        torch.manual_seed(1)
        loss, terms = criterion(model.model(pixels, labels=labels), labels)
    assert calls, "DFineCriterion did not call HungarianMatcher"
    assert loss_d_fine.RTDetrHungarianMatcher is original_matcher
    assert reference.loss_dict.keys() == terms.keys()
    assert any("_dn_" in key for key in terms) == training
    for key, value in reference.loss_dict.items():
        assert torch.allclose(value, terms[key]), key
    assert torch.allclose(reference.loss, loss)
