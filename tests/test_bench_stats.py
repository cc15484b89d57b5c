"""The benchmark's statistics and pure helpers, on known inputs."""

from __future__ import annotations

import hashlib
import math

import pytest

from csidriver.bench.fill import BLOCK, Pattern
from csidriver.bench.plot import Axis, Series, line_chart, nice_ticks
from csidriver.bench.report import evaluate_targets
from csidriver.bench.stats import Summary, cdf, format_seconds, percentile, within


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)


def test_percentile_matches_numpy_type_7_on_small_inputs() -> None:
    # Reference values from numpy.percentile(..., method="linear").
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(values, 40) == pytest.approx(29.0)
    assert percentile(values, 50) == 35.0
    assert percentile(values, 90) == pytest.approx(46.0)
    assert percentile([1.0, 3.0], 50) == 2.0


def test_percentile_of_one_value_is_that_value() -> None:
    for q in (0, 50, 90, 99, 100):
        assert percentile([7.0], q) == 7.0


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_summary_sorts_and_reports_every_field() -> None:
    s = Summary.of([0.004, 0.001, 0.003, 0.002, 0.010])
    assert s.n == 5
    assert s.min == 0.001 and s.max == 0.010
    assert s.p50 == pytest.approx(0.003)
    assert s.p90 == pytest.approx(0.0076)   # 0.004 + 0.6 * (0.010 - 0.004)
    assert s.p99 == pytest.approx(0.00976)  # 0.004 + 0.96 * 0.006
    assert s.mean == pytest.approx(0.004)
    assert set(s.as_dict()) == {"n", "min", "p50", "p90", "p99", "max", "mean"}
    with pytest.raises(ValueError):
        Summary.of([])


def test_cdf_ends_at_one_and_is_sorted() -> None:
    points = cdf([3.0, 1.0, 2.0, 2.0])
    assert points == [(1.0, 0.25), (2.0, 0.5), (2.0, 0.75), (3.0, 1.0)]


def test_within_is_a_relative_band() -> None:
    assert within(1.2, 1.0, 0.2)
    assert within(0.8, 1.0, 0.2)
    assert not within(1.21, 1.0, 0.2)
    assert not within(0.79, 1.0, 0.2)


@pytest.mark.parametrize("seconds, text", [
    (0.00042, "420 µs"), (0.00312, "3.12 ms"), (0.0123, "12.3 ms"), (0.25, "250 ms"),
    (29.4, "29.4 s"), (234.0, "234 s"), (math.nan, "-")])
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_pattern_has_no_two_equal_blocks_and_depends_on_the_seed() -> None:
    chunk = 64 * BLOCK
    data = b"".join(bytes(d) for _, d in Pattern(5, chunk).chunks(3 * chunk + 100))
    assert len(data) == 3 * chunk + 100
    blocks = [data[i:i + BLOCK] for i in range(0, 3 * chunk, BLOCK)]
    assert len(set(blocks)) == len(blocks)
    other = b"".join(bytes(d) for _, d in Pattern(6, chunk).chunks(chunk))
    assert all(other[i:i + BLOCK] != data[i:i + BLOCK] for i in range(0, chunk, BLOCK))
    again = b"".join(bytes(d) for _, d in Pattern(5, chunk).chunks(3 * chunk + 100))
    assert hashlib.sha256(again).digest() == hashlib.sha256(data).digest()


def test_nice_ticks() -> None:
    assert nice_ticks(0, 100, log=False) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0.001, 10, log=True) == [0.001, 0.01, 0.1, 1.0, 10.0]
    short = nice_ticks(0.003, 0.009, log=True)
    assert len(short) >= 2 and all(0.003 <= t <= 0.009 for t in short)


def test_line_chart_is_standalone_svg() -> None:
    svg = line_chart("t <&>", [Series("a", [(1, 0.001), (2, 0.002)], "#000"),
                               Series("empty", [], "#111")],
                     Axis("x"), Axis("y", log=True))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "t &lt;&amp;&gt;" in svg and "<polyline" in svg
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "no data" in line_chart("none", [], Axis("x"), Axis("y"))


def _doc(**overrides: object) -> dict[str, object]:
    def series(scenario: str, op: str, p50: float, **params: object) -> dict[str, object]:
        base = {"driver": "target", "scenario": scenario, "op": op, "size_bytes": 0,
                "filled": False, "depth": 0, "count": 0, "concurrency": 0}
        return {**base, **params, "stats": {"p50": p50, "n": 5}}

    gib = 1 << 30
    results = [series("sizes", "CreateSnapshot", 0.004, size_bytes=gib, filled=True),
               series("sizes", "CreateSnapshot", 0.0045, size_bytes=64 * gib, filled=True),
               series("sizes", "restore", 0.005, size_bytes=gib, filled=True),
               series("sizes", "restore", 0.009, size_bytes=64 * gib, filled=True),
               series("depth", "CreateSnapshot", 0.004, depth=1),
               series("depth", "CreateSnapshot", 0.0047, depth=50),
               series("list", "ListSnapshots", 0.250, count=10000)]
    doc: dict[str, object] = {"results": results, "listings": [],
                              "throughput": [{"driver": "target", "concurrency": 32,
                                              "per_second": 150.0, "errors": 0}]}
    doc.update(overrides)
    return doc


def test_targets_are_judged_plainly() -> None:
    verdicts = {t.name.split(" ")[0] + (" depth" if "chain" in t.name else ""): t
                for t in evaluate_targets(_doc(), "target")}
    assert verdicts["CreateSnapshot"].status == "met"
    restore = verdicts["restore"]
    assert restore.status == "MISSED" and "64.0 GiB" in restore.detail
    assert verdicts["the depth"].status == "met"
    assert verdicts["ListSnapshots"].status == "MISSED"
    assert verdicts["32"].status == "met"


def test_depth_target_names_slow_depths_between_first_and_last() -> None:
    doc = _doc()
    results = doc["results"]
    assert isinstance(results, list)
    results.insert(5, {"driver": "target", "scenario": "depth", "op": "CreateSnapshot",
                       "size_bytes": 0, "filled": False, "depth": 17, "count": 0,
                       "concurrency": 0, "stats": {"p50": 0.020, "n": 5}})
    [depth] = [t for t in evaluate_targets(doc, "target") if "chain" in t.name]
    assert depth.status == "met"
    assert "#17" in depth.detail and "5.0×" in depth.detail


def test_targets_not_measured_say_so() -> None:
    verdicts = evaluate_targets(_doc(results=[], throughput=[]), "target")
    assert [t.status for t in verdicts] == ["not measured"] * 5
