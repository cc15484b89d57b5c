"""``qsnap``: the human face of the driver.

Every command except ``serve`` is a CSI client of a running driver: it
speaks CSI on the driver's socket, plus qsnap's small Inspect service for
what CSI messages cannot carry (names, chains, allocated bytes), and
qsnap's VirtualMachines service for ``qsnap vm`` (whole-VM snapshots,
restore and clone of libvirt domains).  Output is a table for people, or
JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from csidriver.pb import csi_pb2, csi_pb2_grpc, qsnap_pb2, qsnap_pb2_grpc
from csidriver.units import format_ns, format_size, parse_size

DEFAULT_ENDPOINT = "unix:///run/qsnap/csi.sock"


class Client:
    """CSI, Inspect and VirtualMachines stubs on one channel."""

    def __init__(self, endpoint: str, timeout: float = 60.0) -> None:
        target = endpoint
        if endpoint.startswith("tcp://"):
            target = endpoint[len("tcp://"):]
        self.channel = grpc.insecure_channel(target)
        self.timeout = timeout
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.groups = csi_pb2_grpc.GroupControllerStub(self.channel)
        self.inspect = qsnap_pb2_grpc.InspectStub(self.channel)
        self.vms = qsnap_pb2_grpc.VirtualMachinesStub(self.channel)

    def volumes(self) -> Iterator[Any]:
        token = ""
        while True:
            page = self.controller.ListVolumes(
                csi_pb2.ListVolumesRequest(max_entries=500, starting_token=token),
                timeout=self.timeout)
            for entry in page.entries:
                yield entry.volume
            token = page.next_token
            if not token:
                return

    def snapshots(self, volume_id: str = "") -> Iterator[Any]:
        token = ""
        while True:
            page = self.controller.ListSnapshots(
                csi_pb2.ListSnapshotsRequest(max_entries=500, starting_token=token,
                                             source_volume_id=volume_id),
                timeout=self.timeout)
            for entry in page.entries:
                yield entry.snapshot
            token = page.next_token
            if not token:
                return


def _capability(block: bool, fs_type: str) -> Any:
    mode = csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=mode)
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type), access_mode=mode)


def _params(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"qsnap: --param takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


# -- records for output ----------------------------------------------------

def _layers(chain: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"id": layer.id, "depth": layer.depth, "virtual_size": layer.virtual_size,
             "allocated_bytes": layer.allocated_bytes, "read_only": layer.read_only,
             "path": layer.path} for layer in chain]


def _volume_record(client: Client, volume_id: str) -> dict[str, Any]:
    d = client.inspect.DescribeVolume(qsnap_pb2.DescribeVolumeRequest(volume_id=volume_id),
                                      timeout=client.timeout)
    return {"id": d.volume_id, "name": d.name, "size_bytes": d.size_bytes,
            "allocated_bytes": d.allocated_bytes, "created": format_ns(d.created_ns),
            "owner": d.owner, "source_snapshot_id": d.source_snapshot_id,
            "source_volume_id": d.source_volume_id, "depth": len(d.chain),
            "chain": _layers(d.chain), "parameters": dict(d.parameters)}


def _snapshot_record(client: Client, snapshot_id: str,
                     group_id: str | None = None) -> dict[str, Any]:
    """One snapshot for output.  ``group_id``: the group it was cut in, when
    the caller has it from a CSI Snapshot already (a list, a group); else
    it is asked for with GetSnapshot (the CSI message carries it)."""
    d = client.inspect.DescribeSnapshot(
        qsnap_pb2.DescribeSnapshotRequest(snapshot_id=snapshot_id), timeout=client.timeout)
    if group_id is None:
        group_id = client.controller.GetSnapshot(
            csi_pb2.GetSnapshotRequest(snapshot_id=snapshot_id),
            timeout=client.timeout).snapshot.group_snapshot_id
    return {"id": d.snapshot_id, "name": d.name, "source_volume_id": d.source_volume_id,
            "size_bytes": d.size_bytes, "allocated_bytes": d.allocated_bytes,
            "created": format_ns(d.created_ns), "ready_to_use": d.ready_to_use,
            "indications": list(d.indications), "group_snapshot_id": group_id,
            "depth": len(d.chain), "chain": _layers(d.chain), "parameters": dict(d.parameters)}


def _group_record(client: Client, group: Any) -> dict[str, Any]:
    """A csi VolumeGroupSnapshot for output, each member described through Inspect."""
    members = [_snapshot_record(client, s.snapshot_id, s.group_snapshot_id)
               for s in group.snapshots]
    created_ns = group.creation_time.seconds * 1_000_000_000 + group.creation_time.nanos
    return {"id": group.group_snapshot_id, "created": format_ns(created_ns),
            "ready_to_use": group.ready_to_use, "snapshots": members}


def _vm_record(d: Any) -> dict[str, Any]:
    """A VmSnapshotDetails for output (without the domain XML: ``qsnap vm
    show --xml`` prints that)."""
    return {"id": d.snapshot_id, "name": d.name, "domain": d.domain_name,
            "domain_uuid": d.domain_uuid, "created": format_ns(d.created_ns),
            "status": d.status, "online": d.online, "indications": list(d.indications),
            "group_snapshot_id": d.group_snapshot_id, "error": d.error,
            "warnings": list(d.warnings),
            "disks": [{"target": x.target, "volume_id": x.volume_id,
                       "snapshot_id": x.snapshot_id, "attachment": x.attachment,
                       "driver_type": x.driver_type} for x in d.disks],
            "excluded": [{"target": x.target, "source": x.source, "reason": x.reason}
                         for x in d.excluded]}


def _restore_record(r: Any) -> dict[str, Any]:
    return {"domain": r.domain_name, "domain_uuid": r.domain_uuid,
            "volumes": dict(sorted(r.volumes.items())),
            "replaced": dict(sorted(r.replaced.items()))}


# -- output ----------------------------------------------------------------

def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> str:
    head = [title for title, _, _ in columns]
    body = [[fmt(row[key]) for _, key, fmt in columns] for row in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in [head, *body]]
    return "\n".join(lines)


def _details(record: dict[str, Any]) -> str:
    lines = []
    for key, value in record.items():
        if key in ("chain", "parameters"):
            continue
        if key.endswith("bytes"):
            value = f"{format_size(value)} ({value})"
        elif isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"{key + ':':20} {value if value != '' else '-'}")
    if record.get("parameters"):
        lines.append("parameters:")
        lines += [f"  {k} = {v}" for k, v in sorted(record["parameters"].items())]
    lines.append("chain (top first):")
    lines.append(_table(record["chain"], [
        ("  LAYER", "id", lambda x: f"  {x}"), ("DEPTH", "depth", str),
        ("SIZE", "virtual_size", format_size), ("ALLOCATED", "allocated_bytes", format_size),
        ("MODE", "read_only", lambda ro: "read-only" if ro else "writable")]))
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human())


VOLUME_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("ID", "id", str), ("NAME", "name", str), ("SIZE", "size_bytes", format_size),
    ("ALLOCATED", "allocated_bytes", format_size), ("DEPTH", "depth", str),
    ("CREATED", "created", str)]
def _indications(marks: list[str]) -> str:
    return ",".join(marks) or "-"


SNAPSHOT_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("ID", "id", str), ("NAME", "name", str), ("VOLUME", "source_volume_id", str),
    ("SIZE", "size_bytes", format_size), ("READY", "ready_to_use", lambda r: "yes" if r else "no"),
    ("CREATED", "created", str), ("GROUP", "group_snapshot_id", lambda g: g or "-"),
    ("INDICATIONS", "indications", _indications)]
# A group's members: the group's ID and creation time are shown once above.
MEMBER_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("SNAPSHOT", "id", str), ("VOLUME", "source_volume_id", str),
    ("SIZE", "size_bytes", format_size), ("READY", "ready_to_use", lambda r: "yes" if r else "no"),
    ("INDICATIONS", "indications", _indications)]


def _group_details(record: dict[str, Any]) -> str:
    lines = [f"{'id:':20} {record['id']}", f"{'created:':20} {record['created']}",
             f"{'ready_to_use:':20} {record['ready_to_use']}", "snapshots:",
             _table(record["snapshots"], MEMBER_COLUMNS)]
    return "\n".join(lines)


VM_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("ID", "id", str), ("NAME", "name", str), ("DOMAIN", "domain", str),
    ("STATUS", "status", str), ("DISKS", "disks", lambda ds: ",".join(d["target"] for d in ds)),
    ("CREATED", "created", str), ("INDICATIONS", "indications", _indications)]
VM_DISK_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("  TARGET", "target", lambda x: f"  {x}"), ("VOLUME", "volume_id", str),
    ("SNAPSHOT", "snapshot_id", lambda x: x or "-"), ("ATTACHMENT", "attachment", str),
    ("FORMAT", "driver_type", lambda x: x or "-")]
VM_EXCLUDED_COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("  TARGET", "target", lambda x: f"  {x}"), ("SOURCE", "source", lambda x: x or "-"),
    ("REASON", "reason", str)]


def _vm_details(record: dict[str, Any]) -> str:
    lines = [f"{key + ':':20} {value if value not in ('', []) else '-'}"
             for key, value in (
                 ("id", record["id"]), ("name", record["name"]),
                 ("domain", record["domain"]), ("domain_uuid", record["domain_uuid"]),
                 ("created", record["created"]), ("status", record["status"]),
                 ("online", "yes" if record["online"] else "no"),
                 ("indications", ", ".join(record["indications"])),
                 ("group_snapshot_id", record["group_snapshot_id"]),
                 ("error", record["error"]))]
    lines.append("disks (included):")
    lines.append(_table(record["disks"], VM_DISK_COLUMNS) if record["disks"] else "  -")
    lines.append("excluded:")
    lines.append(_table(record["excluded"], VM_EXCLUDED_COLUMNS)
                 if record["excluded"] else "  -")
    lines.append("warnings:")
    lines += [f"  {w}" for w in record["warnings"]] or ["  -"]
    return "\n".join(lines)


def _restore_details(verb: str, snapshot_id: str, record: dict[str, Any]) -> str:
    lines = [f"{verb} domain {record['domain']} ({record['domain_uuid']}) from VM snapshot "
             f"{snapshot_id}", "volumes:"]
    lines += [f"  {t} = {v}" for t, v in record["volumes"].items()] or ["  -"]
    if record["replaced"]:
        lines.append("replaced (kept; delete them with `qsnap volume delete` when done):")
        lines += [f"  {t} = {v}" for t, v in record["replaced"].items()]
    return "\n".join(lines)


# -- commands --------------------------------------------------------------

def cmd_volume_create(client: Client, args: argparse.Namespace) -> None:
    request = csi_pb2.CreateVolumeRequest(
        name=args.name, parameters=_params(args.param),
        capacity_range=csi_pb2.CapacityRange(required_bytes=parse_size(args.size) if args.size else 0),
        volume_capabilities=[_capability(args.block, args.fs_type)])
    if args.from_snapshot:
        request.volume_content_source.snapshot.snapshot_id = args.from_snapshot
    elif args.from_volume:
        request.volume_content_source.volume.volume_id = args.from_volume
    volume = client.controller.CreateVolume(request, timeout=client.timeout).volume
    record = _volume_record(client, volume.volume_id)
    _emit(args, record, lambda: _details(record))


def cmd_restore(client: Client, args: argparse.Namespace) -> None:
    args.from_snapshot, args.from_volume = args.snapshot_id, ""
    cmd_volume_create(client, args)


def cmd_volume_list(client: Client, args: argparse.Namespace) -> None:
    rows = [_volume_record(client, v.volume_id) for v in client.volumes()]
    _emit(args, rows, lambda: _table(rows, VOLUME_COLUMNS))


def cmd_volume_show(client: Client, args: argparse.Namespace) -> None:
    record = _volume_record(client, args.volume_id)
    _emit(args, record, lambda: _details(record))


def cmd_volume_delete(client: Client, args: argparse.Namespace) -> None:
    client.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=args.volume_id),
                                   timeout=client.timeout)
    _emit(args, {"deleted": args.volume_id}, lambda: f"deleted volume {args.volume_id}")


def cmd_volume_expand(client: Client, args: argparse.Namespace) -> None:
    reply = client.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=args.volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=parse_size(args.size))),
        timeout=client.timeout)
    data = {"id": args.volume_id, "size_bytes": reply.capacity_bytes}
    _emit(args, data, lambda: f"volume {args.volume_id} is now {format_size(reply.capacity_bytes)}")


def cmd_snapshot_create(client: Client, args: argparse.Namespace) -> None:
    snapshot = client.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=args.name, source_volume_id=args.volume_id, parameters=_params(args.param)),
        timeout=client.timeout).snapshot
    record = _snapshot_record(client, snapshot.snapshot_id)
    _emit(args, record, lambda: _details(record))


def cmd_snapshot_list(client: Client, args: argparse.Namespace) -> None:
    rows = [_snapshot_record(client, s.snapshot_id, s.group_snapshot_id)
            for s in client.snapshots(args.volume)]
    _emit(args, rows, lambda: _table(rows, SNAPSHOT_COLUMNS))


def cmd_snapshot_show(client: Client, args: argparse.Namespace) -> None:
    record = _snapshot_record(client, args.snapshot_id)
    _emit(args, record, lambda: _details(record))


def cmd_snapshot_delete(client: Client, args: argparse.Namespace) -> None:
    client.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=args.snapshot_id),
                                     timeout=client.timeout)
    _emit(args, {"deleted": args.snapshot_id}, lambda: f"deleted snapshot {args.snapshot_id}")


def cmd_group_create(client: Client, args: argparse.Namespace) -> None:
    group = client.groups.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name=args.name, source_volume_ids=args.volume_ids, parameters=_params(args.param)),
        timeout=client.timeout).group_snapshot
    record = _group_record(client, group)
    _emit(args, record, lambda: _group_details(record))


def cmd_group_show(client: Client, args: argparse.Namespace) -> None:
    group = client.groups.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=args.group_id), timeout=client.timeout).group_snapshot
    record = _group_record(client, group)
    _emit(args, record, lambda: _group_details(record))


def cmd_group_delete(client: Client, args: argparse.Namespace) -> None:
    client.groups.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=args.group_id), timeout=client.timeout)
    _emit(args, {"deleted": args.group_id},
          lambda: f"deleted group snapshot {args.group_id} and its snapshots")


def cmd_vm_snapshot(client: Client, args: argparse.Namespace) -> None:
    reply = client.vms.CreateVmSnapshot(qsnap_pb2.CreateVmSnapshotRequest(
        domain=args.domain, name=args.name, parameters=_params(args.param),
        accept_warnings=args.accept_warnings), timeout=client.timeout)
    record = _vm_record(reply)
    _emit(args, record, lambda: _vm_details(record))


def cmd_vm_list(client: Client, args: argparse.Namespace) -> None:
    reply = client.vms.ListVmSnapshots(qsnap_pb2.ListVmSnapshotsRequest(domain=args.domain),
                                       timeout=client.timeout)
    rows = [_vm_record(s) for s in reply.snapshots]
    _emit(args, rows, lambda: _table(rows, VM_COLUMNS))


def cmd_vm_show(client: Client, args: argparse.Namespace) -> None:
    reply = client.vms.GetVmSnapshot(qsnap_pb2.GetVmSnapshotRequest(snapshot_id=args.snapshot_id),
                                     timeout=client.timeout)
    record = _vm_record(reply)
    if args.xml:
        record["domain_xml"] = reply.domain_xml
        _emit(args, record, lambda: reply.domain_xml.rstrip("\n"))
    else:
        _emit(args, record, lambda: _vm_details(record))


def cmd_vm_restore(client: Client, args: argparse.Namespace) -> None:
    reply = client.vms.RestoreVm(qsnap_pb2.RestoreVmRequest(snapshot_id=args.snapshot_id),
                                 timeout=client.timeout)
    record = _restore_record(reply)
    _emit(args, record, lambda: _restore_details("restored", args.snapshot_id, record))


def cmd_vm_clone(client: Client, args: argparse.Namespace) -> None:
    reply = client.vms.CloneVm(qsnap_pb2.CloneVmRequest(
        snapshot_id=args.snapshot_id, new_name=args.new_name, start=args.start),
        timeout=client.timeout)
    record = _restore_record(reply)
    verb = "cloned and started" if args.start else "cloned"
    _emit(args, record, lambda: _restore_details(verb, args.snapshot_id, record))


def cmd_vm_delete(client: Client, args: argparse.Namespace) -> None:
    client.vms.DeleteVmSnapshot(qsnap_pb2.DeleteVmSnapshotRequest(snapshot_id=args.snapshot_id),
                                timeout=client.timeout)
    _emit(args, {"deleted": args.snapshot_id},
          lambda: f"deleted VM snapshot {args.snapshot_id} and its disk snapshots")


def cmd_pool(client: Client, args: argparse.Namespace) -> None:
    s = client.inspect.PoolStatus(qsnap_pb2.PoolStatusRequest(), timeout=client.timeout)
    data = {"root": s.root, "total_bytes": s.total_bytes, "available_bytes": s.available_bytes,
            "used_bytes": s.used_bytes, "provisioned_bytes": s.provisioned_bytes,
            "volumes": s.volumes, "snapshots": s.snapshots, "layers": s.layers,
            "garbage_layers": s.garbage_layers, "max_depth": s.max_depth,
            "depth_cap": s.depth_cap, "pending_intents": s.pending_intents,
            "reclaimed_layers": s.reclaimed_layers, "collapse_merges": s.collapse_merges,
            "flatten_merges": s.flatten_merges, "maintenance_error": s.maintenance_error}

    def human() -> str:
        return "\n".join(f"{k + ':':20} {format_size(v) + f' ({v})' if k.endswith('bytes') else v}"
                         for k, v in data.items())
    _emit(args, data, human)


# -- argument parsing ------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qsnap", description=(
        "qcow2 snapshots for VM disks, with a local CSI driver. "
        "`qsnap serve` runs the driver; the other commands talk to it."))
    p.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", DEFAULT_ENDPOINT),
                   help=f"the driver's CSI endpoint (default $CSI_ENDPOINT or {DEFAULT_ENDPOINT})")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("serve", help="run the CSI driver (see `qsnap serve --help`)", add_help=False)
    sub.add_parser("bench", help="benchmark snapshot latency of a CSI driver "
                   "(see `qsnap bench --help`)", add_help=False)

    vol = sub.add_parser("volume", help="create, list, show, expand, delete volumes")
    vsub = vol.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = vsub.add_parser("create", help="create an empty volume, a restore or a clone")
    c.add_argument("name")
    c.add_argument("--size", help="size, e.g. 10G (default: 1G, or the source's size)")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--from-snapshot", metavar="SNAPSHOT_ID", help="restore this snapshot")
    src.add_argument("--from-volume", metavar="VOLUME_ID", help="clone this volume")
    _add_volume_options(c)
    c.set_defaults(run=cmd_volume_create)
    vsub.add_parser("list", help="all volumes").set_defaults(run=cmd_volume_list)
    s = vsub.add_parser("show", help="size, allocation, chain and creation time")
    s.add_argument("volume_id")
    s.set_defaults(run=cmd_volume_show)
    e = vsub.add_parser("expand", help="grow a volume")
    e.add_argument("volume_id")
    e.add_argument("size")
    e.set_defaults(run=cmd_volume_expand)
    d = vsub.add_parser("delete", help="delete a volume (its snapshots stay)")
    d.add_argument("volume_id")
    d.set_defaults(run=cmd_volume_delete)

    snap = sub.add_parser("snapshot", help="create, list, show, delete snapshots")
    ssub = snap.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = ssub.add_parser("create", help="snapshot a volume")
    c.add_argument("name")
    c.add_argument("volume_id")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(run=cmd_snapshot_create)
    ls = ssub.add_parser("list", help="all snapshots, or one volume's")
    ls.add_argument("--volume", default="", metavar="VOLUME_ID")
    ls.set_defaults(run=cmd_snapshot_list)
    s = ssub.add_parser("show", help="size, allocation, chain, creation time, readiness")
    s.add_argument("snapshot_id")
    s.set_defaults(run=cmd_snapshot_show)
    d = ssub.add_parser("delete", help="delete a snapshot")
    d.add_argument("snapshot_id")
    d.set_defaults(run=cmd_snapshot_delete)

    grp = sub.add_parser("group", help="create, show, delete group snapshots (several volumes "
                         "cut at one instant)")
    gsub = grp.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = gsub.add_parser("create", help="snapshot volumes together, with one guest freeze")
    c.add_argument("name")
    c.add_argument("volume_ids", nargs="+", metavar="VOLUME_ID")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(run=cmd_group_create)
    s = gsub.add_parser("show", help="a group snapshot and its member snapshots")
    s.add_argument("group_id")
    s.set_defaults(run=cmd_group_show)
    d = gsub.add_parser("delete", help="delete a group snapshot and its member snapshots")
    d.add_argument("group_id")
    d.set_defaults(run=cmd_group_delete)

    vm = sub.add_parser("vm", help="whole-VM snapshots of libvirt domains on qsnap volumes: "
                        "snapshot, list, show, restore, clone, delete")
    msub = vm.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = msub.add_parser("snapshot", help="snapshot every qsnap disk of a domain at one instant "
                        "(one guest freeze), with its definition")
    c.add_argument("domain", help="the domain's name or UUID")
    c.add_argument("name", help="the snapshot's name (unique per domain)")
    c.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="qsnap.csi.dev/guest-agent, qsnap.csi.dev/freeze-deadline, ...")
    c.add_argument("--accept-warnings", action="store_true",
                   help="snapshot the other disks even if some cannot be included "
                        "(hot-plugged disks)")
    c.set_defaults(run=cmd_vm_snapshot)
    ls = msub.add_parser("list", help="all VM snapshots, or one domain's")
    ls.add_argument("domain", nargs="?", default="", help="a domain's name or UUID")
    ls.set_defaults(run=cmd_vm_list)
    s = msub.add_parser("show", help="status, indications, included and excluded disks, "
                        "warnings, error")
    s.add_argument("snapshot_id")
    s.add_argument("--xml", action="store_true", help="print the saved domain definition")
    s.set_defaults(run=cmd_vm_show)
    r = msub.add_parser("restore", help="put a stopped domain back to a snapshot (new volumes; "
                        "the replaced ones are kept and listed)")
    r.add_argument("snapshot_id")
    r.set_defaults(run=cmd_vm_restore)
    c = msub.add_parser("clone", help="a new domain from a snapshot (new name, UUID, MACs "
                        "and volumes)")
    c.add_argument("snapshot_id")
    c.add_argument("new_name")
    c.add_argument("--start", action="store_true", help="start the new domain")
    c.set_defaults(run=cmd_vm_clone)
    d = msub.add_parser("delete", help="delete a VM snapshot and its disk snapshots "
                        "(restored and cloned volumes stay)")
    d.add_argument("snapshot_id")
    d.set_defaults(run=cmd_vm_delete)

    r = sub.add_parser("restore", help="make a new volume from a snapshot")
    r.add_argument("snapshot_id")
    r.add_argument("name", help="name of the new volume")
    r.add_argument("--size", help="a larger size for the new volume")
    _add_volume_options(r)
    r.set_defaults(run=cmd_restore, from_volume="")

    sub.add_parser("pool", help="the pool's space, objects and chain depths").set_defaults(run=cmd_pool)
    return p


def _add_volume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block", action="store_true", help="raw block access instead of a filesystem")
    p.add_argument("--fs-type", default="ext4", choices=["ext4", "xfs"])
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "serve" in argv:
        # Everything after `serve` belongs to the server's own parser.
        at = argv.index("serve")
        if all(a.startswith("-") for a in argv[:at]):
            from csidriver import server
            return server.main(argv[at + 1:])
    if "bench" in argv:
        # Likewise everything after `bench` belongs to the benchmark's parser.
        at = argv.index("bench")
        if all(a.startswith("-") for a in argv[:at]):
            from csidriver import bench
            return bench.main(argv[at + 1:])
    args = _parser().parse_args(argv)
    client = Client(args.endpoint, timeout=args.timeout)
    try:
        args.run(client, args)
    except grpc.RpcError as e:
        code = e.code()  # type: ignore[attr-defined]
        print(f"qsnap: {code.name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            print(f"qsnap: is the driver running at {args.endpoint}? Start it with `qsnap serve`.",
                  file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"qsnap: {e}", file=sys.stderr)
        return 2
    finally:
        client.channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
