"""Turning results into a JSON document, terminal tables and target verdicts.

The JSON document is the source of truth: the terminal table and the HTML
report (``html.py``) are both rendered from it, so a saved ``--json`` file
can be re-rendered later and says everything the screen said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from csidriver.bench.results import Results, SeriesKey
from csidriver.bench.stats import Summary, format_seconds, within
from csidriver.units import format_size

SCHEMA = "qsnap-bench/1"
SCENARIO_ORDER = ("sizes", "depth", "list", "concurrency", "write")
OP_ORDER = ("CreateVolume", "CreateSnapshot", "restore", "clone", "DeleteSnapshot", "DeleteVolume",
            "ListSnapshots")

# The targets for qsnap.
SNAPSHOT_P50 = 0.010
RESTORE_P50 = 0.020
FLAT = 0.20
DEPTH_TOLERANCE = 0.20
LIST_COUNT = 10_000
LIST_P50 = 0.200
CALLERS = 32
SNAPSHOTS_PER_SECOND = 100.0
TARGET_SIZE = 64 << 30


@dataclass(frozen=True)
class TargetResult:
    """One target: what was asked, what was measured, and the verdict
    (``met``, ``MISSED`` or ``not measured``)."""

    name: str
    goal: str
    measured: str
    status: str
    detail: str = ""


def series_record(key: SeriesKey, values: Sequence[float]) -> dict[str, Any]:
    return {**asdict(key), "stats": Summary.of(values).as_dict(), "samples": list(values)}


def build_document(*, results: Results, meta: dict[str, Any]) -> dict[str, Any]:
    """The full JSON report.  ``meta`` carries the run's context (command,
    machine, drivers, config, cleanup, interruption)."""
    with results._lock:
        samples = {k: list(v) for k, v in results.samples.items() if v}
        doc_results = [series_record(k, v) for k, v in sorted(samples.items(), key=_sort_key)]
        throughput = [{**asdict(t), "per_second": t.per_second} for t in results.throughput]
        verifications = [v.as_dict() for v in results.verifications]
        fills = [f.as_dict() for f in results.fills]
        listings = [asdict(x) for x in results.listings]
        skipped = [asdict(x) for x in results.skipped]
        errors = [asdict(x) for x in results.errors]
        extras = dict(results.extras)
    doc: dict[str, Any] = {"schema": SCHEMA, **meta, "results": doc_results,
                           "throughput": throughput, "verifications": verifications,
                           "fills": fills, "listings": listings, "skipped": skipped,
                           "errors": errors, **extras}
    doc["targets"] = [asdict(t) for t in evaluate_targets(doc, "target")]
    if any(r["driver"] == "baseline" for r in doc_results):
        doc["comparison"] = compare(doc)
    return doc


def _sort_key(item: tuple[SeriesKey, Any]) -> tuple[Any, ...]:
    k = item[0]
    return (k.driver != "target", _index(SCENARIO_ORDER, k.scenario), _index(OP_ORDER, k.op),
            k.size_bytes, k.filled, k.depth, k.count, k.concurrency)


def _index(order: Sequence[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


# -- lookups on the document ------------------------------------------------------

def rows(doc: dict[str, Any], driver: str, scenario: str, op: str,
         **match: Any) -> list[dict[str, Any]]:
    return [r for r in doc["results"] if r["driver"] == driver and r["scenario"] == scenario
            and r["op"] == op and all(r[k] == v for k, v in match.items())]


def case_text(r: dict[str, Any]) -> str:
    """The parameters of a series, for people."""
    if r["scenario"] == "sizes":
        return f"{format_size(r['size_bytes'])} {'filled' if r['filled'] else 'empty'}"
    if r["scenario"] == "depth":
        return f"snapshot #{r['depth']} on one volume"
    if r["scenario"] == "list":
        return f"{r['count']} snapshots"
    if r["scenario"] == "concurrency":
        return f"{r['concurrency']} caller{'s' if r['concurrency'] != 1 else ''}"
    if r["scenario"] == "write":
        return "writer running"
    return ""


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["scenario"], r["op"], r["size_bytes"], r["filled"], r["depth"], r["count"],
            r["concurrency"])


def compare(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Target vs baseline p50 for every series both have; ``ratio`` is
    baseline ÷ target (above 1: the target is faster)."""
    baseline = {_key(r): r for r in doc["results"] if r["driver"] == "baseline"}
    out = []
    for r in doc["results"]:
        if r["driver"] != "target" or _key(r) not in baseline:
            continue
        b = baseline[_key(r)]
        t50, b50 = r["stats"]["p50"], b["stats"]["p50"]
        out.append({"scenario": r["scenario"], "op": r["op"], "case": case_text(r),
                    "target_p50": t50, "baseline_p50": b50,
                    "ratio": b50 / t50 if t50 > 0 else None})
    tput = {t["concurrency"]: t for t in doc["throughput"] if t["driver"] == "baseline"}
    for t in doc["throughput"]:
        if t["driver"] == "target" and t["concurrency"] in tput:
            b = tput[t["concurrency"]]
            out.append({"scenario": "concurrency", "op": "snapshots/s",
                        "case": f"{t['concurrency']} callers", "target": t["per_second"],
                        "baseline": b["per_second"],
                        "ratio": t["per_second"] / b["per_second"] if b["per_second"] else None})
    return out


# -- targets ----------------------------------------------------------------------

def evaluate_targets(doc: dict[str, Any], driver: str) -> list[TargetResult]:
    """The issue's targets for qsnap, judged on ``driver``'s results."""
    out = [_size_target(doc, driver, "CreateSnapshot", SNAPSHOT_P50),
           _size_target(doc, driver, "restore", RESTORE_P50),
           _depth_target(doc, driver), _list_target(doc, driver), _throughput_target(doc, driver)]
    return out


def _size_target(doc: dict[str, Any], driver: str, op: str, limit: float) -> TargetResult:
    name = f"{op} p50 ≤ {limit * 1e3:.0f} ms, flat ±{FLAT:.0%} over sizes (filled)"
    goal = f"p50 ≤ {limit * 1e3:.0f} ms at every size 1 GiB..64 GiB filled; all within ±{FLAT:.0%}"
    found = sorted(rows(doc, driver, "sizes", op, filled=True), key=lambda r: r["size_bytes"])
    if not found:
        return TargetResult(name, goal, "-", "not measured", "no filled volumes were measured")
    p50s = [(r["size_bytes"], r["stats"]["p50"]) for r in found]
    measured = ", ".join(f"{format_size(s)}: {format_seconds(p)}" for s, p in p50s)
    slow = [format_size(s) for s, p in p50s if p > limit]
    reference = p50s[0][1]
    uneven = [format_size(s) for s, p in p50s[1:] if not within(p, reference, FLAT)]
    problems = []
    if slow:
        problems.append(f"p50 above {limit * 1e3:.0f} ms at {', '.join(slow)}")
    if uneven:
        problems.append(f"not within ±{FLAT:.0%} of {format_size(p50s[0][0])}'s p50 at "
                        f"{', '.join(uneven)}")
    largest = p50s[-1][0]
    coverage = "" if largest >= TARGET_SIZE else \
        f"sizes measured only up to {format_size(largest)}, not 64 GiB"
    if len(p50s) < 2:
        coverage = "; ".join(filter(None, [coverage, "one size only: flatness not measured"]))
    detail = "; ".join(filter(None, problems + [coverage]))
    return TargetResult(name, goal, measured, "MISSED" if problems else "met", detail)


def _depth_target(doc: dict[str, Any], driver: str) -> TargetResult:
    name = f"the last snapshot of a chain no slower than the 1st (±{DEPTH_TOLERANCE:.0%})"
    found = sorted(rows(doc, driver, "depth", "CreateSnapshot"), key=lambda r: r["depth"])
    if len(found) < 2:
        return TargetResult(name, "p50 of snapshot #50 ≤ 1.2 × p50 of snapshot #1", "-",
                            "not measured", "the depth scenario did not run")
    first, last = found[0], found[-1]
    goal = f"p50 of snapshot #{last['depth']} ≤ {1 + DEPTH_TOLERANCE:.1f} × p50 of snapshot #1"
    f50, l50 = first["stats"]["p50"], last["stats"]["p50"]
    measured = (f"#1: {format_seconds(f50)}, #{last['depth']}: {format_seconds(l50)} "
                f"({l50 / f50:.2f}×, {last['stats']['n']} samples each)")
    met = l50 <= f50 * (1 + DEPTH_TOLERANCE)
    notes = [] if last["depth"] >= 50 else [f"chain only {last['depth']} deep, not 50"]
    # The target names one depth; say so when another one is much slower.
    slow = [r for r in found if r["stats"]["p50"] > f50 * (1 + DEPTH_TOLERANCE)]
    if slow:
        worst = max(slow, key=lambda r: r["stats"]["p50"])
        notes.append(f"but {len(slow)} of {len(found)} depths are slower than #1 by more than "
                     f"{DEPTH_TOLERANCE:.0%}: " + ", ".join(f"#{r['depth']}" for r in slow[:8])
                     + ("..." if len(slow) > 8 else "")
                     + f"; worst #{worst['depth']} at {format_seconds(worst['stats']['p50'])} "
                       f"({worst['stats']['p50'] / f50:.1f}×)")
    return TargetResult(name, goal, measured, "met" if met else "MISSED", "; ".join(notes))


def _list_target(doc: dict[str, Any], driver: str) -> TargetResult:
    name = f"ListSnapshots of {LIST_COUNT} ≤ {LIST_P50 * 1e3:.0f} ms"
    goal = f"p50 of a full listing of {LIST_COUNT} snapshots ≤ {LIST_P50 * 1e3:.0f} ms"
    found = rows(doc, driver, "list", "ListSnapshots", count=LIST_COUNT)
    if not found:
        return TargetResult(name, goal, "-", "not measured",
                            f"no listing at {LIST_COUNT} snapshots was measured")
    p50 = found[0]["stats"]["p50"]
    pages = [x["pages"] for x in doc["listings"] if x["driver"] == driver
             and x["count"] == LIST_COUNT]
    measured = f"{format_seconds(p50)}" + (
        f" ({pages[0]} page{'s' if pages[0] != 1 else ''})" if pages else "")
    return TargetResult(name, goal, measured, "met" if p50 <= LIST_P50 else "MISSED")


def _throughput_target(doc: dict[str, Any], driver: str) -> TargetResult:
    name = f"{CALLERS} parallel callers ≥ {SNAPSHOTS_PER_SECOND:.0f} snapshots/s"
    goal = f"≥ {SNAPSHOTS_PER_SECOND:.0f} CreateSnapshot/s with {CALLERS} callers on distinct volumes"
    found = [t for t in doc["throughput"] if t["driver"] == driver and t["concurrency"] == CALLERS]
    if not found:
        return TargetResult(name, goal, "-", "not measured", f"{CALLERS} callers did not run")
    rate = found[0]["per_second"]
    detail = f"{found[0]['errors']} calls failed" if found[0]["errors"] else ""
    return TargetResult(name, goal, f"{rate:.0f} snapshots/s",
                        "met" if rate >= SNAPSHOTS_PER_SECOND and not found[0]["errors"]
                        else "MISSED", detail)


# -- terminal text ---------------------------------------------------------------------

def _grid(head: list[str], body: list[list[str]], right: set[int]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), *(line(b) for b in body)])


def _shown(r: dict[str, Any], depth: int) -> bool:
    """The terminal shows the depth series at 1, every 10th and the last;
    the JSON and HTML have all of it."""
    return r["scenario"] != "depth" or r["depth"] in (1, depth) or r["depth"] % 10 == 0


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}×" if value >= 100 else f"{value:.2g}×" if value < 10 else f"{value:.1f}×"


def render_text(doc: dict[str, Any]) -> str:
    """Everything a person needs from a run, as plain text."""
    out: list[str] = []
    baseline = {_key(r): r for r in doc["results"] if r["driver"] == "baseline"}
    has_baseline = "baseline" in doc.get("drivers", {})
    depth = doc.get("config", {}).get("depth", 0)
    head = ["SCENARIO", "RPC", "CASE", "N", "MIN", "P50", "P90", "P99", "MAX"]
    if has_baseline:
        head += ["BASELINE P50", "BASE/TARGET"]
    body = []
    for r in doc["results"]:
        if r["driver"] != "target" or not _shown(r, depth):
            continue
        s = r["stats"]
        cells = [r["scenario"], r["op"], case_text(r), str(s["n"]),
                 *(format_seconds(s[f]) for f in ("min", "p50", "p90", "p99", "max"))]
        if has_baseline:
            b = baseline.get(_key(r))
            b50 = b["stats"]["p50"] if b else None
            cells += [format_seconds(b50) if b50 is not None else "-",
                      _ratio(b50 / s["p50"] if b50 is not None and s["p50"] > 0 else None)]
        body.append(cells)
    if body:
        out.append(_grid(head, body, right={3, 4, 5, 6, 7, 8, 9, 10}))
    if doc["throughput"]:
        out.append("")
        base_tput = {t["concurrency"]: t for t in doc["throughput"] if t["driver"] == "baseline"}
        thead = ["CALLERS", "SNAPSHOTS", "SECONDS", "SNAPSHOTS/S"]
        if has_baseline:
            thead += ["BASELINE/S", "TARGET/BASE"]
        tbody = []
        for t in doc["throughput"]:
            if t["driver"] != "target":
                continue
            cells = [str(t["concurrency"]), str(t["calls"]), f"{t['seconds']:.2f}",
                     f"{t['per_second']:.1f}"]
            if has_baseline:
                b = base_tput.get(t["concurrency"])
                cells += [f"{b['per_second']:.1f}" if b else "-",
                          _ratio(t["per_second"] / b["per_second"]) if b and b["per_second"]
                          else "-"]
            tbody.append(cells)
        out.append(_grid(thead, tbody, right=set(range(len(thead)))))
    for v in doc["verifications"]:
        verdict = "ok" if v["ok"] else "FAILED"
        out.append(f"restore verification {v['driver']} {format_size(v['size_bytes'])}: {verdict} "
                   f"(sha256 at snapshot {v['snapshot_digest'][:12]}, restored "
                   f"{v['restored_digest'][:12]}; source changed after the cut: "
                   f"{'yes' if v['source_head_digest'] != v['restored_head_digest'] else 'NO'})")
    for x in doc["listings"]:
        rate = f", {x['added'] / x['add_seconds']:.0f}/s" if x["add_seconds"] > 0 else ""
        out.append(f"list {x['driver']} {x['count']}: {x['listed']} snapshots listed in "
                   f"{x['pages']} page{'s' if x['pages'] != 1 else ''}; making {x['added']} of "
                   "them took "
                   f"{x['add_seconds']:.1f} s (with their volumes{rate})")
    for f in doc["fills"]:
        rate = f["bytes_per_second"] / (1 << 20)
        out.append(f"fill {f['driver']} {format_size(f['size_bytes'])}: {f['seconds']:.1f} s "
                   f"({rate:.0f} MiB/s) via {f['method']}")
    for s in doc["skipped"]:
        out.append(f"skipped: {s['driver']}: {s['scenario']}: {s['text']}")
    for e in doc["errors"]:
        out.append(f"ERROR: {e['driver']}: {e['scenario']}: {e['text']}")
    if doc["targets"]:
        out.append("")
        out.append("qsnap targets (judged on the target driver):")
        out.append(_grid(["TARGET", "MEASURED", "STATUS"],
                         [[t["name"], t["measured"], t["status"] + (f" - {t['detail']}"
                                                                    if t["detail"] else "")]
                          for t in doc["targets"]], right=set()))
    for label, c in doc.get("cleanup", {}).items():
        made = f"{label}: created {c['created_volumes']} volumes and {c['created_snapshots']} snapshots"
        if c["left_volumes"] or c["left_snapshots"] or c["failures"]:
            out.append(f"{made}; LEFT BEHIND {c['left_volumes']} volumes and "
                       f"{c['left_snapshots']} snapshots: {'; '.join(c['failures'][:3])}")
        else:
            out.append(f"{made}; all deleted")
    if doc.get("interrupted"):
        out.append("the run was interrupted: the figures above are partial")
    return "\n".join(out).strip("\n")

