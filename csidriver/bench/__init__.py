"""``qsnap bench``: snapshot latency of any CSI driver, over its socket.

It is a plain CSI client: it needs the Identity and Controller services and
uses the Node service when there is one.  Against qsnap it also uses the
Inspect service to reach volume data (see ``fill.py``).  Everything it
creates it deletes, after an error or Ctrl-C too.

Exit status: 0 done; 1 a scenario failed, a restore did not verify or
something could not be deleted; 2 bad arguments; 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from csidriver.bench.driver import CleanupReport, Endpoint, machine_info, rpc_error_text
from csidriver.bench.fill import choose
from csidriver.bench.htmlreport import render_html
from csidriver.bench.progress import Progress
from csidriver.bench.report import build_document, render_text
from csidriver.bench.results import Results
from csidriver.bench.scenarios import SCENARIOS, Config, Runner, Side, estimate_units
from csidriver.units import parse_size

DEFAULT_ENDPOINT = "unix:///run/qsnap/csi.sock"


def _sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(parse_size(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected sizes like 1G,16G, not {text!r}")
    return values


def _size(text: str) -> int:
    return _sizes(text)[0]


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,32, not {text!r}") from e
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, not {text!r}")
    return values


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0]!r}; choose from "
                                         f"{','.join(SCENARIOS)}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsnap bench",
        description="Benchmark snapshot latency of a CSI driver over its socket: CreateVolume, "
                    "CreateSnapshot, restore, clone, DeleteSnapshot, DeleteVolume across sizes "
                    "and chain depths, ListSnapshots, concurrency.  Deletes everything it "
                    "creates, also on Ctrl-C.",
        epilog="Fill and checksum hooks: 'auto' uses the driver's Node service, else qsnap's "
               "Inspect service; 'node', 'qsnap', 'none', or a command run without a shell with "
               "QSNAP_VOLUME_ID, QSNAP_SIZE_BYTES, QSNAP_ENDPOINT, QSNAP_VOLUME_CONTEXT and "
               "QSNAP_FILL_BYTES + QSNAP_SEED (fill: write that many bytes from offset 0, "
               "different seeds different data) or QSNAP_CHECKSUM_BYTES (checksum: print a hex "
               "digest of that many bytes from offset 0) in its environment.")
    p.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
                   help=f"the driver under test (default $CSI_ENDPOINT or {DEFAULT_ENDPOINT})")
    p.add_argument("--baseline", metavar="ENDPOINT",
                   help="a second driver to run the same scenarios against, interleaved")
    p.add_argument("--scenarios", type=_scenarios, default=SCENARIOS,
                   help=f"which to run, in order (default {','.join(SCENARIOS)})")
    p.add_argument("--sizes", type=_sizes, default=Config.sizes,
                   help="volume sizes of the sizes scenario (default 1G,16G)")
    p.add_argument("--iterations", type=_positive, default=Config.iterations,
                   help="samples per RPC and size (default 10)")
    p.add_argument("--no-fill", dest="fill", action="store_false",
                   help="measure empty volumes only")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the restore verification (a full read of each filled size)")
    p.add_argument("--depth", type=_positive, default=Config.depth,
                   help="snapshots in a row on one volume (default 50)")
    p.add_argument("--depth-repeats", type=_positive, default=Config.depth_repeats,
                   help="volumes the depth series runs on, i.e. samples per depth (default 5)")
    p.add_argument("--volume-size", type=_size, default=Config.volume_size,
                   help="size of the depth, list, concurrency and write volumes (default 1G)")
    p.add_argument("--list", dest="list_counts", type=_counts, default=Config.list_counts,
                   help="snapshot counts to time ListSnapshots at (default 10,1000,10000)")
    p.add_argument("--list-repeats", type=_positive, default=Config.list_repeats,
                   help="timed listings per count (default 5)")
    p.add_argument("--page-size", type=int, default=Config.page_size,
                   help="ListSnapshots max_entries; 0 lets the driver choose (default 500)")
    p.add_argument("--list-per-volume", type=_positive, default=Config.list_per_volume,
                   help="snapshots per volume when making the list population (default 15)")
    p.add_argument("--concurrency", type=_counts, default=Config.concurrency,
                   help="numbers of parallel callers (default 1,8,32)")
    p.add_argument("--per-caller", type=_positive, default=Config.per_caller,
                   help="snapshots per caller (default 10)")
    p.add_argument("--workers", type=_positive, default=Config.workers,
                   help="parallel calls when making and deleting populations (default 8)")
    p.add_argument("--settle", type=float, default=Config.settle, metavar="SECONDS",
                   help="pause after each scenario's cleanup for drivers that cannot say when "
                        "their background work is done (qsnap can; default 1)")
    p.add_argument("--seed", type=int, default=Config.seed, help="seed of the fill data")
    p.add_argument("--access", choices=["block", "mount"], default="block",
                   help="volume access type requested (default block)")
    p.add_argument("--fs-type", default="ext4", help="filesystem for --access mount")
    for prefix, who in (("", "the target"), ("baseline-", "the baseline")):
        p.add_argument(f"--{prefix}fill-hook", default="auto", metavar="HOOK",
                       help=f"how to write data into {who}'s volumes (default auto)")
        p.add_argument(f"--{prefix}checksum-hook", default="auto", metavar="HOOK",
                       help=f"how to checksum {who}'s volumes (default auto)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds per call (default 1800: copying drivers are slow on big volumes)")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report with plots")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    return p


@contextmanager
def _signals(on_signal: Any) -> Iterator[None]:
    """Install ``on_signal`` for SIGINT and SIGTERM for the block, then put
    the previous handlers back.  Only the main thread may do this; from
    another thread (an embedding test) the handlers stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM ends the run like Ctrl-C: with cleanup.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(arguments)
    config = Config(sizes=args.sizes, iterations=args.iterations, fill=args.fill,
                    verify=args.verify, depth=args.depth, depth_repeats=args.depth_repeats,
                    volume_size=args.volume_size, list_counts=args.list_counts,
                    list_repeats=args.list_repeats, page_size=max(0, args.page_size),
                    list_per_volume=args.list_per_volume, concurrency=args.concurrency,
                    per_caller=args.per_caller, workers=args.workers,
                    settle=max(0.0, args.settle), scenarios=args.scenarios,
                    seed=args.seed)
    run_id = secrets.token_hex(3)
    endpoints = [Endpoint("target", args.endpoint, timeout=args.timeout, run_id=run_id,
                          block=args.access == "block", fs_type=args.fs_type)]
    if args.baseline:
        endpoints.append(Endpoint("baseline", args.baseline, timeout=args.timeout, run_id=run_id,
                                  block=args.access == "block", fs_type=args.fs_type))
    progress = Progress(1, sys.stderr, enabled=args.progress)
    results = Results()
    stop = threading.Event()
    started = dt.datetime.now(dt.timezone.utc)
    machine = machine_info()
    t0 = time.monotonic()
    interrupted, crashed, status = False, False, 0
    cleanups: dict[str, CleanupReport] = {}
    drivers: dict[str, dict[str, Any]] = {}
    try:
        with _signals(_interrupt):
            try:
                sides = _prepare(endpoints, args, drivers)
                progress.total = estimate_units(config, sides)
                for side in sides:
                    progress.note(f"qsnap bench: {side.label}: {drivers[side.label]['name']} "
                                  f"{drivers[side.label]['version']} at {side.endpoint.endpoint}; "
                                  f"fill: {drivers[side.label]['fill']}")
                Runner(config, sides, results, progress, stop).run()
            except KeyboardInterrupt:
                interrupted = True
                stop.set()
                progress.note("qsnap bench: interrupted; deleting what the run created")
            except _Unusable as e:
                progress.note(f"qsnap bench: {e}")
                status = e.status
            except Exception:
                crashed = True
                stop.set()
                progress.note("qsnap bench: the run failed; deleting what it created\n"
                              + traceback.format_exc().rstrip())
    finally:
        # Cleanup must finish even if Ctrl-C is pressed again.
        with _signals(lambda s, f: progress.note(
                "qsnap bench: still deleting what the run created; please wait")):
            for ep in endpoints:
                progress.phase(f"cleanup: {ep.label}")
                cleanups[ep.label] = _final_cleanup(ep, config.workers, progress)
                ep.close()
        progress.finish()
    if status:
        return status
    doc = build_document(results=results, meta={
        "tool": "qsnap bench", "started": started.isoformat(timespec="seconds"),
        "duration_seconds": time.monotonic() - t0, "command": ["qsnap", "bench", *arguments],
        "machine": {**machine, "load_average_at_end": list(os.getloadavg())}, "drivers": drivers, "config": config.as_dict(),
        "run_id": run_id, "interrupted": interrupted, "failed": crashed,
        "cleanup": {ep.label: {**cleanups[ep.label].as_dict(), **_created(ep)}
                    for ep in endpoints}})
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.html:
        Path(args.html).write_text(render_html(doc))
    print(render_text(doc))
    if interrupted:
        return 130
    problems = (crashed or doc["errors"] or any(not v["ok"] for v in doc["verifications"])
                or any(c["failures"] or c["left_volumes"] or c["left_snapshots"]
                       for c in doc["cleanup"].values()))
    return 1 if problems else 0


class _Unusable(Exception):
    """The run cannot start: no driver, or arguments the driver cannot serve."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _prepare(endpoints: list[Endpoint], args: argparse.Namespace,
             drivers: dict[str, dict[str, Any]]) -> list[Side]:
    sides = []
    for ep in endpoints:
        try:
            info = ep.probe()
        except grpc.RpcError as e:
            raise _Unusable(f"{ep.label}: cannot talk to the driver at {ep.endpoint}: "
                            f"{rpc_error_text(e)}", 1) from e
        missing = {"CREATE_DELETE_VOLUME", "CREATE_DELETE_SNAPSHOT"} - info.controller
        if missing:
            raise _Unusable(f"{ep.label}: {info.name} lacks {', '.join(sorted(missing))}: "
                            "nothing to benchmark", 1)
        prefix = "baseline_" if ep.label == "baseline" else ""
        try:
            filler, fill_note = choose(getattr(args, f"{prefix}fill_hook"), ep, "fill")
            summer, sum_note = choose(getattr(args, f"{prefix}checksum_hook"), ep, "checksum")
        except ValueError as e:
            raise _Unusable(str(e), 2) from e
        side = Side(ep, filler, fill_note, summer, sum_note)  # type: ignore[arg-type]
        drivers[ep.label] = {**info.as_dict(),
                             "fill": filler.description if filler else f"none: {fill_note}",
                             "checksum": summer.description if summer else f"none: {sum_note}"}
        sides.append(side)
    return sides


def _final_cleanup(ep: Endpoint, workers: int, progress: Progress) -> CleanupReport:
    def tick(done: int, total: int) -> None:
        progress.phase(f"cleanup: {ep.label}: deleted {done}/{total}")

    try:
        report = ep.cleanup(workers=workers, progress=tick)
    except grpc.RpcError as e:
        report = CleanupReport(failures=[rpc_error_text(e)])
    volumes, snapshots = ep.tracker.counts()
    if volumes or snapshots or report.failures:
        progress.note(f"qsnap bench: {ep.label}: could not delete {volumes} volumes and "
                      f"{snapshots} snapshots: {'; '.join(report.failures[:3])}")
    return report


def _created(ep: Endpoint) -> dict[str, Any]:
    volumes, snapshots = ep.tracker.counts()
    return {"created_volumes": ep.tracker.created["volume"],
            "created_snapshots": ep.tracker.created["snapshot"],
            "left_volumes": volumes, "left_snapshots": snapshots,
            "left_ids": list(ep.tracker.volumes) + list(ep.tracker.snapshots)}


__all__ = ["main"]
