"""Metrics against hand-worked cases."""

import numpy as np
import pytest

from UltramotionIGTLib.tools.metrics import average_precision, box_iou_np, dice


def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(box_iou_np(a, b), [[50 / 150, 0.0, 1.0]])


def test_ap_perfect_and_ranking():
    gt = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [20, 20, 30, 30]])]
    perfect = [(gt[0], np.array([0.9])), (gt[1], np.array([0.8, 0.7]))]
    assert average_precision(perfect, gt) == pytest.approx(1.0)
    # a false positive ranked first: precisions 1/2, 2/3, 3/4 at recalls 1/3, 2/3, 1; the interpolated
    # precision (max to the right) is 3/4 everywhere -> AP = 3/4
    with_fp = [
        (np.array([[50, 50, 60, 60], [0, 0, 10, 10]]), np.array([0.99, 0.9])),
        (gt[1], np.array([0.8, 0.7])),
    ]
    assert average_precision(with_fp, gt) == pytest.approx(3 / 4)
    # a duplicate of a matched box is a false positive; a missed box caps recall at 2/3
    missed = [(gt[0], np.array([0.9])), (np.array([[0, 0, 10, 10], [0, 0, 10, 10]]), np.array([0.8, 0.7]))]
    assert average_precision(missed, gt) == pytest.approx(2 / 3)


def test_ap_empty_cases():
    assert average_precision([(np.zeros((0, 4)), np.zeros(0))], [np.zeros((0, 4))]) == 1.0
    assert average_precision([(np.array([[0, 0, 1, 1]]), np.array([0.5]))], [np.zeros((0, 4))]) == 0.0


def test_dice():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
