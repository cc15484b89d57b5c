"""The ``qsnap`` CLI against a real server: snapshots show their
indications and group, and ``qsnap group create/show/delete`` drive the
GroupController.  Run in-process (``cli.main``) with the output captured."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from rootconf import run, run_json  # noqa: E402

if TYPE_CHECKING:
    from conftest import Driver


def volume(driver: Driver, capsys: pytest.CaptureFixture[str], name: str) -> str:
    return str(run_json(driver, capsys, "volume", "create", name, "--size", "4M")["id"])


def test_snapshot_shows_indications_and_no_group(driver: Driver,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    v = volume(driver, capsys, "db")
    s = run_json(driver, capsys, "snapshot", "create", "db-1", v,
                 "--param", "qsnap.csi.dev/guest-agent=disabled")
    # A closed volume is cut offline, and the record says so.
    assert s["indications"] == ["Offline"]
    assert s["group_snapshot_id"] == ""
    assert run_json(driver, capsys, "snapshot", "show", s["id"]) == s
    [listed] = run_json(driver, capsys, "snapshot", "list")
    assert listed == s

    code, out, _ = run(driver, capsys, "snapshot", "show", s["id"])
    assert code == 0
    assert "indications:" in out and "Offline" in out
    assert "group_snapshot_id:" in out
    code, out, _ = run(driver, capsys, "snapshot", "list")
    head, row = out.splitlines()
    assert head.split() == ["ID", "NAME", "VOLUME", "SIZE", "READY", "CREATED", "GROUP",
                            "INDICATIONS"]
    assert row.startswith(s["id"]) and row.split()[-2:] == ["-", "Offline"]


def test_group_create_show_delete(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = volume(driver, capsys, "data"), volume(driver, capsys, "log")
    g = run_json(driver, capsys, "group", "create", "app", a, b,
                 "--param", "qsnap.csi.dev/freeze-deadline=30s")
    assert g["id"].startswith("g-") and g["ready_to_use"]
    assert sorted(m["source_volume_id"] for m in g["snapshots"]) == sorted([a, b])
    for member in g["snapshots"]:
        assert member["group_snapshot_id"] == g["id"]
        assert member["indications"] == ["Offline"]
        assert member["parameters"] == {"qsnap.csi.dev/freeze-deadline": "30s"}
    # Idempotent by name, like the RPC.
    assert run_json(driver, capsys, "group", "create", "app", b, a,
                    "--param", "qsnap.csi.dev/freeze-deadline=30s") == g
    assert run_json(driver, capsys, "group", "show", g["id"]) == g
    # Members are snapshots: listed with their group, shown alone with it.
    listed = run_json(driver, capsys, "snapshot", "list")
    assert {s["id"]: s["group_snapshot_id"] for s in listed} == \
        {m["id"]: g["id"] for m in g["snapshots"]}
    member = g["snapshots"][0]
    assert run_json(driver, capsys, "snapshot", "show", member["id"]) == member

    code, out, _ = run(driver, capsys, "group", "show", g["id"])
    assert code == 0
    assert g["id"] in out and "snapshots:" in out
    assert all(m["id"] in out for m in g["snapshots"])
    code, out, _ = run(driver, capsys, "snapshot", "list")
    rows = out.splitlines()[1:]
    assert len(rows) == 2 and all(row.split()[-2] == g["id"] for row in rows)

    code, out, _ = run(driver, capsys, "group", "delete", g["id"])
    assert code == 0 and f"deleted group snapshot {g['id']}" in out
    assert run_json(driver, capsys, "snapshot", "list") == []
    code, _, err = run(driver, capsys, "group", "show", g["id"])
    assert code == 1 and "NOT_FOUND" in err
    # Deleting what is gone is done already.
    assert run(driver, capsys, "group", "delete", g["id"])[0] == 0


def test_group_create_errors(driver: Driver, capsys: pytest.CaptureFixture[str]) -> None:
    a = volume(driver, capsys, "a")
    code, _, err = run(driver, capsys, "group", "create", "twice", a, a)
    assert code == 1 and "INVALID_ARGUMENT" in err
    code, _, err = run(driver, capsys, "group", "create", "gone", a, "v-" + "0" * 32)
    assert code == 1 and "NOT_FOUND" in err
    code, _, err = run(driver, capsys, "group", "create", "bad", a,
                       "--param", "qsnap.csi.dev/guest-agent=sometimes")
    assert code == 1 and "INVALID_ARGUMENT" in err
    with pytest.raises(SystemExit):
        run(driver, capsys, "group", "create", "no-volumes")
    with pytest.raises(SystemExit):
        run(driver, capsys, "group", "create", "bad-param", a, "--param", "novalue")
