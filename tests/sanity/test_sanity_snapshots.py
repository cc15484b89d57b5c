"""Port of csi-test pkg/sanity/controller.go's snapshot suites:
DescribeSanity("ListSnapshots [Controller Server]"),
DescribeSanity("DeleteSnapshot [Controller Server]") and
DescribeSanity("CreateSnapshot [Controller Server]").

Each test is one upstream ``It``; the Describe-level BeforeEach capability
check is the first line of every test.
"""

from __future__ import annotations

import grpc

import sanity_lib as S
from sanity_lib import r_fixture, sc_fixture  # noqa: F401  (fixtures)
from sanity_lib import csi_pb2

Code = grpc.StatusCode


def _list_snapshots(sc, r, **kw):
    req = csi_pb2.ListSnapshotsRequest(secrets=sc.secrets.list_snapshots or {}, **kw)
    return S.expect_ok(lambda: r.controller.ListSnapshots(req, timeout=S.CALL_TIMEOUT))


# ---------------------------------------------------------------------------
# DescribeSanity("ListSnapshots [Controller Server]")
# ---------------------------------------------------------------------------

def _require_list_snapshots(sc):
    S.require_controller_capability(sc, "LIST_SNAPSHOTS", "ListSnapshots not supported")


def test_list_snapshots_should_return_appropriate_values_no_optional_values_added(sc, r):
    """ListSnapshots [Controller Server] / It("should return appropriate values (no optional values added)")."""
    _require_list_snapshots(sc)
    snapshots = _list_snapshots(sc, r)
    assert snapshots is not None
    for entry in snapshots.entries:
        S.verify_snapshot_info(entry.snapshot if entry.HasField("snapshot") else None)


def test_list_snapshots_should_return_snapshots_that_match_the_specified_snapshot_id(sc, r):
    """ListSnapshots [Controller Server] / It("should return snapshots that match the specified snapshot id")."""
    _require_list_snapshots(sc)
    # One snapshot to find by id, two unrelated ones that must not be returned.
    r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("listSnapshots-volume-unrelated-s-1")),
        S.unique_string("listSnapshots-snapshot-unrelated-s-1"))
    target, _ = r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("listSnapshots-volume-target-s")),
        S.unique_string("listSnapshots-snapshot-target-s"))
    r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("listSnapshots-volume-unrelated-s-2")),
        S.unique_string("listSnapshots-snapshot-unrelated-s-2"))

    snapshots = _list_snapshots(sc, r, snapshot_id=target.snapshot.snapshot_id)
    assert len(snapshots.entries) == 1, snapshots
    S.verify_snapshot_info(snapshots.entries[0].snapshot)
    assert snapshots.entries[0].snapshot.snapshot_id == target.snapshot.snapshot_id


def test_list_snapshots_should_return_empty_when_the_specified_snapshot_id_does_not_exist(sc, r):
    """ListSnapshots [Controller Server] / It("should return empty when the specified snapshot id does not exist")."""
    _require_list_snapshots(sc)
    snapshots = _list_snapshots(sc, r, snapshot_id="none-exist-id")
    assert len(snapshots.entries) == 0, snapshots


def test_list_snapshots_should_return_snapshots_that_match_the_specified_source_volume_id(sc, r):
    """ListSnapshots [Controller Server] / It("should return snapshots that match the specified source volume id")."""
    _require_list_snapshots(sc)
    r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("listSnapshots-volume-unrelated-v-1")),
        S.unique_string("listSnapshots-snapshot-unrelated-v-1"))
    target, _ = r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("listSnapshots-volume-target-v")),
        S.unique_string("listSnapshots-snapshot-target-v"))
    r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("listSnapshots-volume-unrelated-v-2")),
        S.unique_string("listSnapshots-snapshot-unrelated-v-2"))

    snapshots = _list_snapshots(sc, r, source_volume_id=target.snapshot.source_volume_id)
    assert len(snapshots.entries) == 1, snapshots
    snapshot = snapshots.entries[0].snapshot
    S.verify_snapshot_info(snapshot)
    assert snapshot.source_volume_id == target.snapshot.source_volume_id


def test_list_snapshots_should_return_empty_when_the_specified_source_volume_id_does_not_exist(sc, r):
    """ListSnapshots [Controller Server] / It("should return empty when the specified source volume id does not exist")."""
    _require_list_snapshots(sc)
    snapshots = _list_snapshots(sc, r, source_volume_id=sc.id_gen.generate_unique_valid_volume_id())
    assert len(snapshots.entries) == 0, snapshots


def test_list_snapshots_check_the_presence_of_new_snapshots_in_the_snapshot_list(sc, r):
    """ListSnapshots [Controller Server] / It("check the presence of new snapshots in the snapshot list")."""
    _require_list_snapshots(sc)
    total = len(_list_snapshots(sc, r).entries)

    snapshot, _ = r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("listSnapshots-volume-3")),
        S.unique_string("listSnapshots-snapshot-3"))
    S.verify_snapshot_info(snapshot.snapshot)
    assert len(_list_snapshots(sc, r).entries) == total + 1

    # "deleting the snapshot"
    S.expect_ok(lambda: r.delete_snapshot(csi_pb2.DeleteSnapshotRequest(
        snapshot_id=snapshot.snapshot.snapshot_id, secrets=sc.secrets.delete_snapshot or {})))
    # "checking if deleted snapshot is omitted"
    assert len(_list_snapshots(sc, r).entries) == total


def test_list_snapshots_should_return_next_token_when_a_limited_number_of_entries_are_requested(sc, r):
    """ListSnapshots [Controller Server] / It("should return next token when a limited number of entries are requested")."""
    _require_list_snapshots(sc)
    min_snapshot_count, max_entries = 5, 2

    initial = len(_list_snapshots(sc, r).entries)
    current = initial
    if initial < min_snapshot_count:
        # "creating required new volumes"
        required = min_snapshot_count - initial
        for i in range(1, required + 1):
            snapshot, _ = r.must_create_snapshot_from_volume_request(
                S.make_create_volume_req(sc, S.unique_string(f"volume{i}")),
                S.unique_string(f"snapshot{i}"))
            S.verify_snapshot_info(snapshot.snapshot)
        current += required

    snapshots = _list_snapshots(sc, r, max_entries=max_entries)
    next_token = snapshots.next_token
    assert len(snapshots.entries) == max_entries, snapshots

    # starting_token and no max_entries: all the remaining entries at once.
    snapshots = _list_snapshots(sc, r, starting_token=next_token)
    assert len(snapshots.entries) == current - max_entries, snapshots


# ---------------------------------------------------------------------------
# DescribeSanity("DeleteSnapshot [Controller Server]")
# ---------------------------------------------------------------------------

def _require_delete_snapshot(sc):
    S.require_controller_capability(sc, "CREATE_DELETE_SNAPSHOT", "DeleteSnapshot not supported")


def test_delete_snapshot_should_fail_when_no_snapshot_id_is_provided(sc, r):
    """DeleteSnapshot [Controller Server] / It("should fail when no snapshot id is provided") -> INVALID_ARGUMENT."""
    _require_delete_snapshot(sc)
    req = csi_pb2.DeleteSnapshotRequest(secrets=sc.secrets.delete_snapshot or {})
    S.expect_error_code(lambda: r.delete_snapshot(req), Code.INVALID_ARGUMENT)


def test_delete_snapshot_should_succeed_when_an_invalid_snapshot_id_is_used(sc, r):
    """DeleteSnapshot [Controller Server] / It("should succeed when an invalid snapshot id is used")."""
    _require_delete_snapshot(sc)
    S.expect_ok(lambda: r.delete_snapshot(S.make_delete_snapshot_req(sc, "reallyfakesnapshotid")))


def test_delete_snapshot_should_return_appropriate_values_no_optional_values_added(sc, r):
    """DeleteSnapshot [Controller Server] / It("should return appropriate values (no optional values added)")."""
    _require_delete_snapshot(sc)
    # As upstream: creates a volume and a snapshot; the DeleteSnapshot itself
    # happens in the cleanup, whose failure fails the spec.
    volume = S.expect_ok(lambda: r.create_volume(
        S.make_create_volume_req(sc, S.unique_string("DeleteSnapshot-volume-1"))))
    r.must_create_snapshot(S.make_create_snapshot_req(
        sc, S.unique_string("DeleteSnapshot-snapshot-1"), volume.volume.volume_id))


# ---------------------------------------------------------------------------
# DescribeSanity("CreateSnapshot [Controller Server]")
# ---------------------------------------------------------------------------

def _require_create_snapshot(sc):
    S.require_controller_capability(sc, "CREATE_DELETE_SNAPSHOT", "CreateSnapshot not supported")


def test_create_snapshot_should_fail_when_no_name_is_provided(sc, r):
    """CreateSnapshot [Controller Server] / It("should fail when no name is provided") -> INVALID_ARGUMENT."""
    _require_create_snapshot(sc)
    req = csi_pb2.CreateSnapshotRequest(source_volume_id="testId", secrets=sc.secrets.create_snapshot or {})
    S.expect_error_code(lambda: r.create_snapshot(req), Code.INVALID_ARGUMENT)


def test_create_snapshot_should_fail_when_no_source_volume_id_is_provided(sc, r):
    """CreateSnapshot [Controller Server] / It("should fail when no source volume id is provided") -> INVALID_ARGUMENT."""
    _require_create_snapshot(sc)
    req = csi_pb2.CreateSnapshotRequest(name="name", secrets=sc.secrets.create_snapshot or {})
    S.expect_error_code(lambda: r.create_snapshot(req), Code.INVALID_ARGUMENT)


def test_create_snapshot_should_succeed_when_requesting_to_create_a_snapshot_with_already_existing_name_and_same_source_volume_id(sc, r):
    """CreateSnapshot [Controller Server] / It("should succeed when requesting to create a snapshot with
    already existing name and same source volume ID")."""
    _require_create_snapshot(sc)
    volume = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("CreateSnapshot-volume-1")))
    req = S.make_create_snapshot_req(sc, S.unique_string("CreateSnapshot-snapshot-1"), volume.volume.volume_id)
    r.must_create_snapshot(req)
    # "creating a snapshot with the same name and source volume ID"
    r.must_create_snapshot(req)


def test_create_snapshot_should_fail_when_requesting_to_create_a_snapshot_with_already_existing_name_and_different_source_volume_id(sc, r):
    """CreateSnapshot [Controller Server] / It("should fail when requesting to create a snapshot with
    already existing name and different source volume ID") -> ALREADY_EXISTS."""
    _require_create_snapshot(sc)
    name = S.unique_string("CreateSnapshot-snapshot-2")
    r.must_create_snapshot_from_volume_request(
        S.make_create_volume_req(sc, S.unique_string("CreateSnapshot-volume-2")), name)
    volume2 = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("CreateSnapshot-volume-3")))
    req = S.make_create_snapshot_req(sc, name, volume2.volume.volume_id)
    S.expect_error_code(lambda: r.create_snapshot(req), Code.ALREADY_EXISTS)


def test_create_snapshot_should_succeed_when_creating_snapshot_with_maximum_length_name(sc, r):
    """CreateSnapshot [Controller Server] / It("should succeed when creating snapshot with maximum-length name")."""
    _require_create_snapshot(sc)
    volume = r.must_create_volume(S.make_create_volume_req(sc, S.unique_string("CreateSnapshot-volume-maxlen-name")))
    name = S.unique_string_with_length("CreateSnapshot-snapshot-maxlen", S.MAX_NAME_LENGTH)
    assert len(name) == S.MAX_NAME_LENGTH
    req = S.make_create_snapshot_req(sc, name, volume.volume.volume_id)
    r.must_create_snapshot(req)
    r.must_create_snapshot(req)  # upstream creates it twice ("TODO: review if ... necessary")
