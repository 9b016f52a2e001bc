"""The latency-under-load grade: the DSLReports bufferbloat scale, its edges exact."""

import pytest

import iperf_client


@pytest.mark.parametrize("added_ms, grade", [
    (-1.0, "A+"), (0.0, "A+"), (4.99, "A+"), (5.0, "A"), (29.9, "A"), (30.0, "B"), (59.9, "B"),
    (60.0, "C"), (199.9, "C"), (200.0, "D"), (399.9, "D"), (400.0, "F"), (5000.0, "F"),
])
def test_each_edge_belongs_to_the_worse_grade(added_ms, grade):
    assert iperf_client.latency_grade(added_ms) == grade


@pytest.mark.parametrize("added_ms", [None, float("nan"), float("inf")])
def test_no_figure_has_no_grade(added_ms):
    assert iperf_client.latency_grade(added_ms) is None
