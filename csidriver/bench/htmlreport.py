"""The self-contained HTML report: tables and inline SVG plots, no network.

Rendered from the JSON document (``report.build_document``), so it shows
exactly what ``--json`` saved.  Plots: latency vs volume size, latency vs
chain depth, latency CDFs, ListSnapshots vs snapshot count, throughput and
latency vs concurrency.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from html import escape
from typing import Any

from csidriver.bench.plot import Axis, Series, color, line_chart
from csidriver.bench.report import OP_ORDER, case_text, rows
from csidriver.bench.stats import cdf, format_seconds
from csidriver.units import format_size

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1280px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 9px; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.met { color: #17803d; font-weight: 600; } .missed { color: #c62828; font-weight: 600; }
.unmeasured { color: #8a6d00; font-weight: 600; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; }
svg.chart { border: 1px solid #e4e4e4; }
code, pre { background: #f6f6f6; padding: 1px 4px; } pre { padding: 8px; overflow-x: auto; }
"""

MAIN_OPS = ("CreateSnapshot", "restore", "clone", "CreateVolume", "DeleteSnapshot", "DeleteVolume")


def _load(values: Any) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "?"


def _ms(seconds: float) -> str:
    return format_seconds(seconds)


def _ms_axis(label: str, log: bool = True) -> Axis:
    return Axis(label, log=log, fmt=_ms)


def _drivers(doc: dict[str, Any]) -> list[str]:
    return [d for d in ("target", "baseline") if d in doc.get("drivers", {})]


def _driver_name(doc: dict[str, Any], driver: str) -> str:
    info = doc["drivers"][driver]
    return f"{driver} ({info.get('name') or info.get('endpoint')})"


def chart_sizes(doc: dict[str, Any], driver: str) -> str:
    series = []
    for i, op in enumerate(MAIN_OPS):
        for filled in (True, False):
            found = sorted(rows(doc, driver, "sizes", op, filled=filled),
                           key=lambda r: r["size_bytes"])
            if found:
                series.append(Series(f"{op} {'filled' if filled else 'empty'}",
                                     [(r["size_bytes"], r["stats"]["p50"]) for r in found],
                                     color(i), dashed=not filled))
    sizes = sorted({r["size_bytes"] for r in doc["results"] if r["scenario"] == "sizes"})
    return line_chart(f"p50 latency vs volume size: {_driver_name(doc, driver)}", series,
                      Axis("volume size", log=True, fmt=lambda v: format_size(int(v)),
                           ticks=sizes or None),
                      _ms_axis("p50 latency"))


def chart_depth(doc: dict[str, Any]) -> str:
    series = []
    for d, driver in enumerate(_drivers(doc)):
        for i, op in enumerate(("CreateSnapshot", "restore")):
            found = sorted(rows(doc, driver, "depth", op), key=lambda r: r["depth"])
            if not found:
                continue
            series.append(Series(f"{op} p50 ({driver})",
                                 [(r["depth"], r["stats"]["p50"]) for r in found],
                                 color(i), dashed=d == 1))
            series.append(Series(f"{op} p90 ({driver})",
                                 [(r["depth"], r["stats"]["p90"]) for r in found],
                                 color(i + 4), dashed=d == 1, markers=False))
    return line_chart("latency of the n-th snapshot on one volume, and of restoring it", series,
                      Axis("snapshot number on the volume (chain depth)",
                           fmt=lambda v: f"{v:.0f}"),
                      _ms_axis("latency"))


def charts_cdf(doc: dict[str, Any]) -> list[str]:
    """One CDF per RPC, a line per driver, size and fill state."""
    out = []
    by_op: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        if r["scenario"] == "sizes":
            by_op[r["op"]].append(r)
    for op in [o for o in OP_ORDER if o in by_op]:
        series = []
        for i, r in enumerate(sorted(by_op[op], key=lambda r: (r["driver"] != "target",
                                                                 r["size_bytes"], r["filled"]))):
            series.append(Series(f"{r['driver']} {case_text(r)}", cdf(r["samples"]), color(i),
                                 dashed=r["driver"] == "baseline", step=True, markers=False))
        out.append(line_chart(f"{op}: latency CDF", series, _ms_axis("latency"),
                              Axis("fraction of calls ≤ latency", fmt=lambda v: f"{v:.0%}",
                                   ticks=[0, 0.25, 0.5, 0.75, 1.0], zero=True),
                              width=420, height=300))
    for scenario, label in (("concurrency", "concurrency"), ("write", "snapshot while writing")):
        found = [r for r in doc["results"] if r["scenario"] == scenario]
        if found:
            series = [Series(f"{r['driver']} {case_text(r)}", cdf(r["samples"]), color(i),
                             dashed=r["driver"] == "baseline", step=True, markers=False)
                      for i, r in enumerate(found)]
            out.append(line_chart(f"CreateSnapshot, {label}: latency CDF", series,
                                  _ms_axis("latency"),
                                  Axis("fraction of calls ≤ latency", fmt=lambda v: f"{v:.0%}",
                                       ticks=[0, 0.25, 0.5, 0.75, 1.0], zero=True),
                                  width=420, height=300))
    return out


def chart_list(doc: dict[str, Any]) -> str:
    series = []
    for d, driver in enumerate(_drivers(doc)):
        found = sorted(rows(doc, driver, "list", "ListSnapshots"), key=lambda r: r["count"])
        for j, stat in enumerate(("p50", "max")):
            if found:
                series.append(Series(f"{stat} ({driver})",
                                     [(r["count"], r["stats"][stat]) for r in found],
                                     color(j), dashed=d == 1))
    counts = sorted({r["count"] for r in doc["results"] if r["scenario"] == "list"})
    return line_chart("ListSnapshots, every page, vs number of snapshots", series,
                      Axis("snapshots", log=True, fmt=lambda v: f"{v:.0f}", ticks=counts or None),
                      _ms_axis("time to list all"))


def charts_concurrency(doc: dict[str, Any]) -> list[str]:
    tput, lat = [], []
    levels = sorted({t["concurrency"] for t in doc["throughput"]})
    for d, driver in enumerate(_drivers(doc)):
        found = sorted((t for t in doc["throughput"] if t["driver"] == driver),
                       key=lambda t: t["concurrency"])
        if found:
            tput.append(Series(f"snapshots/s ({driver})",
                               [(t["concurrency"], t["per_second"]) for t in found], color(d),
                               dashed=d == 1))
        rs = sorted(rows(doc, driver, "concurrency", "CreateSnapshot"),
                    key=lambda r: r["concurrency"])
        for j, stat in enumerate(("p50", "p99")):
            if rs:
                lat.append(Series(f"{stat} ({driver})",
                                  [(r["concurrency"], r["stats"][stat]) for r in rs], color(j + 2),
                                  dashed=d == 1))
    caller_axis = Axis("parallel callers (distinct volumes)", log=True, fmt=lambda v: f"{v:.0f}",
                       ticks=levels or None)
    return [line_chart("CreateSnapshot throughput vs concurrency", tput, caller_axis,
                       Axis("snapshots per second", fmt=lambda v: f"{v:g}", zero=True)),
            line_chart("CreateSnapshot latency vs concurrency", lat, caller_axis,
                       _ms_axis("latency"))]


def _table(head: Sequence[str], body: Sequence[Sequence[str]], numeric: set[int]) -> str:
    out = ["<table><thead><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in body:
        out.append("<tr>" + "".join(
            f'<td class="n">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _results_table(doc: dict[str, Any]) -> str:
    body = []
    for r in doc["results"]:
        s = r["stats"]
        body.append([r["driver"], r["scenario"], r["op"], case_text(r), str(s["n"]),
                     *(_ms(s[f]) for f in ("min", "p50", "p90", "p99", "max"))])
    return _table(["driver", "scenario", "RPC", "case", "n", "min", "p50", "p90", "p99", "max"],
                  body, numeric={4, 5, 6, 7, 8, 9})


def render_html(doc: dict[str, Any]) -> str:
    """The whole report as one HTML page."""
    h: list[str] = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
                    "<title>qsnap bench report</title>", f"<style>{STYLE}</style></head><body>",
                    "<h1>qsnap bench: CSI snapshot latency</h1>"]
    machine = doc.get("machine", {})
    h.append("<p>")
    h.append(f"Started {escape(doc.get('started', ''))}, took {doc.get('duration_seconds', 0):.0f} s "
             f"on <b>{escape(str(machine.get('hostname', '?')))}</b>: "
             f"{machine.get('cpus', '?')} CPUs ({escape(str(machine.get('cpu_model', '')))}), "
             f"{format_size(int(machine.get('memory_bytes', 0)))} RAM, "
             f"kernel {escape(str(machine.get('kernel', '')))}; load average "
             f"{_load(machine.get('load_average'))} at the start, "
             f"{_load(machine.get('load_average_at_end'))} at the end.")
    if doc.get("interrupted"):
        h.append(" <b class=\"missed\">The run was interrupted: the figures are partial.</b>")
    h.append("</p>")
    h.append(f"<pre>{escape(' '.join(doc.get('command', [])))}</pre>")
    drivers = doc.get("drivers", {})
    h.append(_table(["", "driver", "version", "endpoint", "fill", "checksum"],
                    [[label, d.get("name", ""), d.get("version", ""), d.get("endpoint", ""),
                      d.get("fill", ""), d.get("checksum", "")] for label, d in drivers.items()],
                    numeric=set()))

    if doc.get("targets"):
        h.append("<h2>qsnap targets</h2>")
        rows_html = []
        for t in doc["targets"]:
            cls = {"met": "met", "MISSED": "missed"}.get(t["status"], "unmeasured")
            rows_html.append(f"<tr><td>{escape(t['name'])}</td><td>{escape(t['goal'])}</td>"
                             f"<td>{escape(t['measured'])}</td><td class=\"{cls}\">"
                             f"{escape(t['status'])}</td><td>{escape(t['detail'])}</td></tr>")
        h.append("<table><thead><tr><th>target</th><th>goal</th><th>measured</th><th>status</th>"
                 "<th>note</th></tr></thead><tbody>" + "".join(rows_html) + "</tbody></table>")

    if any(r["scenario"] == "sizes" for r in doc["results"]):
        h.append("<h2>Latency vs volume size</h2><p>p50 of each RPC; solid lines are volumes "
                 "filled with non-repeating data, dashed lines empty volumes.</p>"
                 "<div class=\"charts\">")
        h += [chart_sizes(doc, d) for d in _drivers(doc)
              if any(r["driver"] == d and r["scenario"] == "sizes" for r in doc["results"])]
        h.append("</div>")
    if any(r["scenario"] == "depth" for r in doc["results"]):
        h.append("<h2>Latency vs chain depth</h2><p>Snapshot after snapshot on one volume: the "
                 "n-th snapshot's latency and the latency of restoring it; each point is over "
                 f"{doc.get('config', {}).get('depth_repeats', '?')} volumes.</p>")
        h.append(f"<div class=\"charts\">{chart_depth(doc)}</div>")
    cdfs = charts_cdf(doc)
    if cdfs:
        h.append("<h2>Latency CDFs</h2><div class=\"charts\">" + "".join(cdfs) + "</div>")
    if any(r["scenario"] == "list" for r in doc["results"]):
        h.append("<h2>ListSnapshots</h2><p>Time to list every snapshot following "
                 f"<code>next_token</code>, page size {doc.get('config', {}).get('page_size')}.</p>")
        h.append(f"<div class=\"charts\">{chart_list(doc)}</div>")
        h.append(_table(["driver", "snapshots", "listed", "pages", "made for this count",
                         "seconds to make them"],
                        [[x["driver"], str(x["count"]), str(x["listed"]), str(x["pages"]),
                          str(x["added"]), f"{x['add_seconds']:.1f}"] for x in doc["listings"]],
                        numeric={1, 2, 3, 4, 5}))
    if doc.get("throughput"):
        h.append("<h2>Throughput vs concurrency</h2><p>N callers, each snapshotting its own "
                 "volume, started together.</p><div class=\"charts\">"
                 + "".join(charts_concurrency(doc)) + "</div>")

    if doc.get("comparison"):
        h.append("<h2>Target vs baseline</h2>")
        body = []
        for c in doc["comparison"]:
            if "target_p50" in c:
                body.append([c["scenario"], c["op"], c["case"], _ms(c["target_p50"]),
                             _ms(c["baseline_p50"]),
                             f"{c['ratio']:.3g}×" if c["ratio"] is not None else "-"])
            else:
                body.append([c["scenario"], c["op"], c["case"], f"{c['target']:.1f}/s",
                             f"{c['baseline']:.1f}/s",
                             f"{c['ratio']:.3g}×" if c["ratio"] is not None else "-"])
        h.append(_table(["scenario", "RPC", "case", "target", "baseline",
                         "ratio (how many times better the target is)"], body, numeric={3, 4, 5}))

    h.append("<h2>All results</h2>")
    h.append(_results_table(doc))
    if doc.get("verifications"):
        h.append("<h2>Restore verification</h2>")
        h.append(_table(["driver", "size", "sha256 at snapshot", "sha256 restored",
                         "source changed after cut", "result"],
                        [[v["driver"], format_size(v["size_bytes"]), v["snapshot_digest"][:16],
                          v["restored_digest"][:16],
                          "yes" if v["source_head_digest"] != v["restored_head_digest"] else "NO",
                          "ok" if v["ok"] else "FAILED"] for v in doc["verifications"]],
                        numeric=set()))
    if doc.get("fills"):
        h.append("<h2>Fills</h2>")
        h.append(_table(["driver", "size", "seconds", "MiB/s", "method"],
                        [[f["driver"], format_size(f["size_bytes"]), f"{f['seconds']:.1f}",
                          f"{f['bytes_per_second'] / (1 << 20):.0f}", f["method"]]
                         for f in doc["fills"]], numeric={2, 3}))
    notes = [("skipped", s) for s in doc.get("skipped", [])] + \
            [("ERROR", e) for e in doc.get("errors", [])]
    if notes:
        h.append("<h2>Skipped and failed</h2><ul>")
        h += [f"<li><b>{kind}</b> {escape(n['driver'])}: {escape(n['scenario'])}: "
              f"{escape(n['text'])}</li>" for kind, n in notes]
        h.append("</ul>")
    h.append("<h2>Configuration</h2>")
    h.append(f"<pre>{escape(json.dumps(doc.get('config', {}), indent=2))}</pre>")
    h.append("</body></html>")
    return "\n".join(h)
