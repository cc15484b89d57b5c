"""The durable catalog: SQLite in WAL mode with synchronous=FULL.

It records layers, volumes, snapshots and intents.  An *intent* is written
in the same transaction that plans a multi-step change, before any file is
touched, and deleted in the transaction that completes it; at start-up the
pool finishes or undoes every intent still present.  Layers an intent names
(``intent_layers``) count as referenced, so the reclaimer never removes a
layer a half-done operation still needs.

The catalog only stores and queries; it makes no decisions.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import Busy, CatalogCorrupt, PoolFull
from engine.model import (GroupSnapshot, Layer, Owner, Publication, Snapshot, SnapshotSource,
                          Staging, Volume, VolumeSource)

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS layers (
    id           TEXT PRIMARY KEY,
    parent       TEXT REFERENCES layers(id),
    depth        INTEGER NOT NULL,
    virtual_size INTEGER NOT NULL,
    read_only    INTEGER NOT NULL DEFAULT 0,
    created_ns   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS volumes (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL UNIQUE,
    size         INTEGER NOT NULL,
    created_ns   INTEGER NOT NULL,
    top          TEXT NOT NULL REFERENCES layers(id),
    owner        TEXT NOT NULL DEFAULT 'closed',
    source_kind  TEXT,
    source_id    TEXT,
    parameters   TEXT NOT NULL DEFAULT '{}',
    capabilities TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS volumes_top ON volumes(top);
CREATE TABLE IF NOT EXISTS snapshots (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL UNIQUE,
    source       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    created_ns   INTEGER NOT NULL,
    layer        TEXT NOT NULL REFERENCES layers(id),
    ready        INTEGER NOT NULL DEFAULT 1,
    parameters   TEXT NOT NULL DEFAULT '{}',
    indications  TEXT NOT NULL DEFAULT '[]',
    group_id     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS snapshots_layer ON snapshots(layer);
CREATE INDEX IF NOT EXISTS snapshots_source ON snapshots(source);
CREATE TABLE IF NOT EXISTS groups (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL UNIQUE,
    created_ns   INTEGER NOT NULL,
    parameters   TEXT NOT NULL DEFAULT '{}',
    indications  TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS vm_snapshots (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    domain_uuid  TEXT NOT NULL,
    created_ns   INTEGER NOT NULL,
    record       TEXT NOT NULL,       -- JSON, engine/vm.py owns its shape
    UNIQUE (domain_uuid, name)
);
CREATE TABLE IF NOT EXISTS intents (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS intent_layers (
    intent_id INTEGER NOT NULL REFERENCES intents(id) ON DELETE CASCADE,
    layer     TEXT NOT NULL,
    role      TEXT NOT NULL,          -- 'new': made by the intent, 'pin': must stay
    PRIMARY KEY (intent_id, layer)
);
CREATE INDEX IF NOT EXISTS intent_layers_layer ON intent_layers(layer);
CREATE TABLE IF NOT EXISTS stagings (
    volume_id    TEXT PRIMARY KEY REFERENCES volumes(id),
    staging_path TEXT NOT NULL,
    access       TEXT NOT NULL,        -- 'block' or 'mount'
    fs_type      TEXT NOT NULL DEFAULT '',
    mount_flags  TEXT NOT NULL DEFAULT '[]',
    read_only    INTEGER NOT NULL DEFAULT 0,
    export_path  TEXT NOT NULL,
    device       TEXT NOT NULL DEFAULT '',
    state        TEXT NOT NULL         -- 'staging', 'staged' or 'unstaging'
);
CREATE TABLE IF NOT EXISTS publications (
    volume_id   TEXT NOT NULL REFERENCES stagings(volume_id),
    target_path TEXT NOT NULL,
    read_only   INTEGER NOT NULL,
    PRIMARY KEY (volume_id, target_path)
);
"""

# A layer is garbage when nothing refers to it: no volume has it as top, no
# snapshot points at it, no layer is backed by it and no intent pins it.
_GARBAGE = """
SELECT l.id FROM layers l
WHERE NOT EXISTS (SELECT 1 FROM volumes v WHERE v.top = l.id)
  AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.layer = l.id)
  AND NOT EXISTS (SELECT 1 FROM layers c WHERE c.parent = l.id)
  AND NOT EXISTS (SELECT 1 FROM intent_layers i WHERE i.layer = l.id)
"""


@dataclass(frozen=True)
class Intent:
    id: int
    kind: str
    body: dict[str, Any]
    created_ns: int


class Catalog:
    """One SQLite connection, used under a lock by any thread.

    :raises CatalogCorrupt: the file is not a qsnap catalog of a known version.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as tx:
            tx.executescript_in_tx(_SCHEMA)
            row = tx.one("SELECT value FROM meta WHERE key = 'schema'")
            if row is None:
                tx.run("INSERT INTO meta(key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) == 1:
                # Version 2 added group snapshots and VM snapshots: the new
                # tables came with the script above, the column comes here.
                tx.run("ALTER TABLE snapshots ADD COLUMN group_id TEXT NOT NULL DEFAULT ''")
                tx.run("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise CatalogCorrupt(f"catalog {path} has schema {row['value']}, "
                                     f"this qsnap knows {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator["Tx"]:
        """A write transaction (BEGIN IMMEDIATE); commits on success.

        :raises PoolFull: SQLite could not write because the disk is full.
        :raises Busy: another process holds the catalog's write lock.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                text = str(e).lower()
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if "full" in text:
                    raise PoolFull(f"the catalog cannot grow: {e}") from e
                if "locked" in text or "busy" in text:
                    # Only a process other than qsnap can hold the write lock
                    # (the pool lock keeps a second driver out): retry later.
                    raise Busy(f"the catalog {self.path} is locked by another process") from e
                raise

    @contextmanager
    def reading(self) -> Iterator["Tx"]:
        """A consistent read (no write lock taken)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield Tx(self._db)
            finally:
                self._db.execute("COMMIT")


class Tx:
    """Queries and updates inside one transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- raw -------------------------------------------------------------

    def run(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
        return row

    def all(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self._db.execute(sql, args).fetchall())

    def executescript_in_tx(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    # -- layers ----------------------------------------------------------

    def add_layer(self, layer: Layer, created_ns: int) -> None:
        self.run("INSERT INTO layers(id, parent, depth, virtual_size, read_only, created_ns)"
                 " VALUES (?, ?, ?, ?, ?, ?)",
                 (layer.id, layer.parent, layer.depth, layer.virtual_size,
                  int(layer.read_only), created_ns))

    def layer(self, layer_id: str) -> Layer | None:
        row = self.one("SELECT * FROM layers WHERE id = ?", (layer_id,))
        return _layer(row) if row else None

    def need_layer(self, layer_id: str) -> Layer:
        layer = self.layer(layer_id)
        if layer is None:
            raise CatalogCorrupt(f"layer {layer_id} is referenced but not recorded")
        return layer

    def chain(self, layer_id: str) -> list[Layer]:
        """The layer and its ancestors, top first."""
        rows = self.all("""
            WITH RECURSIVE up(id, n) AS (
                SELECT ?, 0
                UNION ALL
                SELECT l.parent, up.n + 1 FROM layers l JOIN up ON l.id = up.id
                WHERE l.parent IS NOT NULL)
            SELECT layers.* FROM up JOIN layers ON layers.id = up.id ORDER BY up.n""",
                        (layer_id,))
        return [_layer(r) for r in rows]

    def children(self, layer_id: str) -> list[Layer]:
        return [_layer(r) for r in self.all("SELECT * FROM layers WHERE parent = ?", (layer_id,))]

    def set_read_only(self, layer_id: str) -> None:
        self.run("UPDATE layers SET read_only = 1 WHERE id = ?", (layer_id,))

    def set_layer_size(self, layer_id: str, size: int) -> None:
        self.run("UPDATE layers SET virtual_size = ? WHERE id = ?", (size, layer_id))

    def reparent(self, layer_id: str, parent: str | None) -> None:
        """Point a layer at a new parent and fix the depth of its subtree."""
        base = 0
        if parent is not None:
            base = self.need_layer(parent).depth
        self.run("UPDATE layers SET parent = ?, depth = ? WHERE id = ?", (parent, base + 1, layer_id))
        self.run("""
            WITH RECURSIVE down(id, depth) AS (
                SELECT id, depth FROM layers WHERE id = ?
                UNION ALL
                SELECT l.id, down.depth + 1 FROM layers l JOIN down ON l.parent = down.id)
            UPDATE layers SET depth = (SELECT depth FROM down WHERE down.id = layers.id)
            WHERE id IN (SELECT id FROM down)""", (layer_id,))

    def drop_layer(self, layer_id: str) -> None:
        self.run("DELETE FROM layers WHERE id = ?", (layer_id,))

    def garbage(self) -> list[str]:
        return [r["id"] for r in self.all(_GARBAGE)]

    def all_layers(self) -> list[Layer]:
        return [_layer(r) for r in self.all("SELECT * FROM layers")]

    def references(self, layer_id: str) -> tuple[int, int, int]:
        """(volumes with it as top, snapshots on it, child layers)."""
        row = self.one("""SELECT
            (SELECT COUNT(*) FROM volumes WHERE top = :id),
            (SELECT COUNT(*) FROM snapshots WHERE layer = :id),
            (SELECT COUNT(*) FROM layers WHERE parent = :id)""", {"id": layer_id})  # type: ignore[arg-type]
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def pinned(self, layer_id: str) -> bool:
        return self.one("SELECT 1 FROM intent_layers WHERE layer = ?", (layer_id,)) is not None

    def pinned_elsewhere(self, layer_id: str, intent_id: int) -> bool:
        """Whether an intent other than ``intent_id`` pins the layer."""
        return self.one("SELECT 1 FROM intent_layers WHERE layer = ? AND intent_id != ?",
                        (layer_id, intent_id)) is not None

    # -- volumes ---------------------------------------------------------

    def add_volume(self, v: Volume) -> None:
        kind, source_id = _source_columns(v.source)
        self.run("INSERT INTO volumes(id, name, size, created_ns, top, owner, source_kind,"
                 " source_id, parameters, capabilities) VALUES (?,?,?,?,?,?,?,?,?,?)",
                 (v.id, v.name, v.size_bytes, v.created_ns, v.top_layer, v.owner.value,
                  kind, source_id, json.dumps(v.parameters, sort_keys=True), v.capabilities))

    def volume(self, volume_id: str) -> Volume | None:
        row = self.one("SELECT * FROM volumes WHERE id = ?", (volume_id,))
        return _volume(row) if row else None

    def volume_by_name(self, name: str) -> Volume | None:
        row = self.one("SELECT * FROM volumes WHERE name = ?", (name,))
        return _volume(row) if row else None

    def volume_with_top(self, layer_id: str) -> Volume | None:
        row = self.one("SELECT * FROM volumes WHERE top = ?", (layer_id,))
        return _volume(row) if row else None

    def volumes_page(self, after_seq: int, limit: int) -> list[tuple[int, Volume]]:
        rows = self.all("SELECT * FROM volumes WHERE seq >= ? ORDER BY seq LIMIT ?",
                        (after_seq, limit))
        return [(int(r["seq"]), _volume(r)) for r in rows]

    def set_top(self, volume_id: str, layer_id: str) -> None:
        self.run("UPDATE volumes SET top = ? WHERE id = ?", (layer_id, volume_id))

    def retarget_top(self, old_layer: str, new_layer: str) -> None:
        self.run("UPDATE volumes SET top = ? WHERE top = ?", (new_layer, old_layer))

    def set_volume_size(self, volume_id: str, size: int) -> None:
        self.run("UPDATE volumes SET size = ? WHERE id = ?", (size, volume_id))

    def drop_volume(self, volume_id: str) -> None:
        self.run("DELETE FROM volumes WHERE id = ?", (volume_id,))

    def provisioned_bytes(self) -> int:
        row = self.one("SELECT COALESCE(SUM(size), 0) FROM volumes")
        return int(row[0]) if row else 0

    def set_owner(self, volume_id: str, owner: Owner) -> None:
        self.run("UPDATE volumes SET owner = ? WHERE id = ?", (owner.value, volume_id))

    # -- node: stagings and publications ------------------------------------

    def staging(self, volume_id: str) -> Staging | None:
        row = self.one("SELECT * FROM stagings WHERE volume_id = ?", (volume_id,))
        return _staging(row) if row else None

    def stagings(self) -> list[Staging]:
        return [_staging(r) for r in self.all("SELECT * FROM stagings ORDER BY volume_id")]

    def put_staging(self, s: Staging) -> None:
        self.run("INSERT OR REPLACE INTO stagings(volume_id, staging_path, access, fs_type,"
                 " mount_flags, read_only, export_path, device, state)"
                 " VALUES (?,?,?,?,?,?,?,?,?)",
                 (s.volume_id, s.staging_path, s.access, s.fs_type, json.dumps(list(s.mount_flags)),
                  int(s.read_only), s.export_path, s.device, s.state))

    def drop_staging(self, volume_id: str) -> None:
        self.run("DELETE FROM stagings WHERE volume_id = ?", (volume_id,))

    def publications(self, volume_id: str) -> list[Publication]:
        return [Publication(r["volume_id"], r["target_path"], bool(r["read_only"]))
                for r in self.all("SELECT * FROM publications WHERE volume_id = ?"
                                  " ORDER BY target_path", (volume_id,))]

    def put_publication(self, p: Publication) -> None:
        self.run("INSERT OR REPLACE INTO publications(volume_id, target_path, read_only)"
                 " VALUES (?, ?, ?)", (p.volume_id, p.target_path, int(p.read_only)))

    def drop_publication(self, volume_id: str, target_path: str) -> None:
        self.run("DELETE FROM publications WHERE volume_id = ? AND target_path = ?",
                 (volume_id, target_path))

    # -- snapshots -------------------------------------------------------

    def add_snapshot(self, s: Snapshot) -> None:
        self.run("INSERT INTO snapshots(id, name, source, size, created_ns, layer, ready,"
                 " parameters, indications, group_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
                 (s.id, s.name, s.source_volume_id, s.size_bytes, s.created_ns, s.layer,
                  int(s.ready), json.dumps(s.parameters, sort_keys=True),
                  json.dumps(list(s.indications)), s.group_id))

    def snapshot(self, snapshot_id: str) -> Snapshot | None:
        row = self.one("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,))
        return _snapshot(row) if row else None

    def snapshot_by_name(self, name: str) -> Snapshot | None:
        row = self.one("SELECT * FROM snapshots WHERE name = ?", (name,))
        return _snapshot(row) if row else None

    def snapshots_page(self, after_seq: int, limit: int, *, snapshot_id: str | None = None,
                       source: str | None = None) -> list[tuple[int, Snapshot]]:
        sql = f"SELECT {_SNAPSHOT_COLUMNS} FROM snapshots WHERE seq >= ?"
        args: list[Any] = [after_seq]
        if snapshot_id is not None:
            sql += " AND id = ?"
            args.append(snapshot_id)
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit)).fetchall()
        return [(int(r[0]), _snapshot_row(r)) for r in rows]

    def retarget_snapshots(self, old_layer: str, new_layer: str) -> None:
        self.run("UPDATE snapshots SET layer = ? WHERE layer = ?", (new_layer, old_layer))

    def drop_snapshot(self, snapshot_id: str) -> None:
        self.run("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def group_members(self, group_id: str) -> list[Snapshot]:
        return [_snapshot(r) for r in self.all(
            "SELECT * FROM snapshots WHERE group_id = ? ORDER BY seq", (group_id,))]

    # -- group snapshots -------------------------------------------------

    def add_group(self, g: GroupSnapshot) -> None:
        self.run("INSERT INTO groups(id, name, created_ns, parameters, indications)"
                 " VALUES (?,?,?,?,?)",
                 (g.id, g.name, g.created_ns, json.dumps(g.parameters, sort_keys=True),
                  json.dumps(list(g.indications))))

    def group(self, group_id: str) -> GroupSnapshot | None:
        row = self.one("SELECT * FROM groups WHERE id = ?", (group_id,))
        return self._group(row) if row else None

    def group_by_name(self, name: str) -> GroupSnapshot | None:
        row = self.one("SELECT * FROM groups WHERE name = ?", (name,))
        return self._group(row) if row else None

    def _group(self, row: sqlite3.Row) -> GroupSnapshot:
        members = tuple(r["id"] for r in self.all(
            "SELECT id FROM snapshots WHERE group_id = ? ORDER BY seq", (row["id"],)))
        return GroupSnapshot(id=row["id"], name=row["name"], created_ns=int(row["created_ns"]),
                             snapshot_ids=members, parameters=_parameters(row["parameters"]),
                             indications=_indications(row["indications"]))

    def drop_group(self, group_id: str) -> None:
        self.run("DELETE FROM groups WHERE id = ?", (group_id,))

    # -- VM snapshots ----------------------------------------------------

    def put_vm_snapshot(self, snapshot_id: str, name: str, domain_uuid: str, created_ns: int,
                        record: dict[str, Any]) -> None:
        self.run("INSERT INTO vm_snapshots(id, name, domain_uuid, created_ns, record)"
                 " VALUES (?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                 (snapshot_id, name, domain_uuid, created_ns, json.dumps(record, sort_keys=True)))

    def vm_snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        row = self.one("SELECT record FROM vm_snapshots WHERE id = ?", (snapshot_id,))
        return dict(json.loads(row["record"])) if row else None

    def vm_snapshot_by_name(self, domain_uuid: str, name: str) -> dict[str, Any] | None:
        row = self.one("SELECT record FROM vm_snapshots WHERE domain_uuid = ? AND name = ?",
                       (domain_uuid, name))
        return dict(json.loads(row["record"])) if row else None

    def vm_snapshots(self, domain_uuid: str | None = None) -> list[dict[str, Any]]:
        if domain_uuid is None:
            rows = self.all("SELECT record FROM vm_snapshots ORDER BY seq")
        else:
            rows = self.all("SELECT record FROM vm_snapshots WHERE domain_uuid = ? ORDER BY seq",
                            (domain_uuid,))
        return [dict(json.loads(r["record"])) for r in rows]

    def drop_vm_snapshot(self, snapshot_id: str) -> None:
        self.run("DELETE FROM vm_snapshots WHERE id = ?", (snapshot_id,))

    def count(self, table: str) -> int:
        assert table in ("volumes", "snapshots", "layers", "intents", "groups", "vm_snapshots")
        row = self.one(f"SELECT COUNT(*) FROM {table}")
        return int(row[0]) if row else 0

    # -- intents ---------------------------------------------------------

    def add_intent(self, kind: str, body: dict[str, Any], created_ns: int, *,
                   new: tuple[str, ...] = (), pins: tuple[str, ...] = ()) -> int:
        cur = self.run("INSERT INTO intents(kind, body, created_ns) VALUES (?, ?, ?)",
                       (kind, json.dumps(body, sort_keys=True), created_ns))
        intent_id = int(cur.lastrowid or 0)
        for layer in new:
            self.run("INSERT INTO intent_layers(intent_id, layer, role) VALUES (?, ?, 'new')",
                     (intent_id, layer))
        for layer in pins:
            self.run("INSERT OR IGNORE INTO intent_layers(intent_id, layer, role)"
                     " VALUES (?, ?, 'pin')", (intent_id, layer))
        return intent_id

    def drop_intent(self, intent_id: int) -> None:
        self.run("DELETE FROM intent_layers WHERE intent_id = ?", (intent_id,))
        self.run("DELETE FROM intents WHERE id = ?", (intent_id,))

    def intents(self) -> list[Intent]:
        return [Intent(int(r["id"]), r["kind"], json.loads(r["body"]), int(r["created_ns"]))
                for r in self.all("SELECT * FROM intents ORDER BY id")]

    def intent_new_layers(self) -> set[str]:
        return {r["layer"] for r in self.all("SELECT layer FROM intent_layers WHERE role = 'new'")}


def _source_columns(source: SnapshotSource | VolumeSource | None) -> tuple[str | None, str | None]:
    if isinstance(source, SnapshotSource):
        return "snapshot", source.snapshot_id
    if isinstance(source, VolumeSource):
        return "volume", source.volume_id
    return None, None


def _layer(row: sqlite3.Row) -> Layer:
    return Layer(id=row["id"], parent=row["parent"], depth=int(row["depth"]),
                 virtual_size=int(row["virtual_size"]), read_only=bool(row["read_only"]))


def _volume(row: sqlite3.Row) -> Volume:
    source: SnapshotSource | VolumeSource | None = None
    if row["source_kind"] == "snapshot":
        source = SnapshotSource(row["source_id"])
    elif row["source_kind"] == "volume":
        source = VolumeSource(row["source_id"])
    return Volume(id=row["id"], name=row["name"], size_bytes=int(row["size"]),
                  created_ns=int(row["created_ns"]), top_layer=row["top"],
                  owner=Owner(row["owner"]), source=source,
                  parameters=_parameters(row["parameters"]), capabilities=row["capabilities"])


def _staging(row: sqlite3.Row) -> Staging:
    return Staging(volume_id=row["volume_id"], staging_path=row["staging_path"],
                   access=row["access"], fs_type=row["fs_type"],
                   mount_flags=tuple(json.loads(row["mount_flags"])),
                   read_only=bool(row["read_only"]), export_path=row["export_path"],
                   device=row["device"], state=row["state"])


# The texts nearly every row holds, decoded once: listing 10 000 snapshots
# spent most of its time in json.loads.
_COMMON_INDICATIONS: dict[str, tuple[str, ...]] = {
    text: tuple(json.loads(text)) for text in
    ('[]', '["Offline"]', '["Online"]', '["Online", "FilesystemFrozen"]')}


def _parameters(text: str) -> dict[str, str]:
    return {} if text == "{}" else dict(json.loads(text))


def _indications(text: str) -> tuple[str, ...]:
    known = _COMMON_INDICATIONS.get(text)
    return known if known is not None else tuple(json.loads(text))


# Positional reads for pages of thousands of snapshots (name lookups on
# sqlite3.Row cost more than the rest of the conversion).
_SNAPSHOT_COLUMNS = ("seq, id, name, source, size, created_ns, layer, ready, parameters,"
                     " indications, group_id")


def _snapshot_row(r: tuple[Any, ...]) -> Snapshot:
    return Snapshot(id=r[1], name=r[2], source_volume_id=r[3], size_bytes=int(r[4]),
                    created_ns=int(r[5]), layer=r[6], ready=bool(r[7]),
                    parameters=_parameters(r[8]), indications=_indications(r[9]),
                    group_id=r[10])


def _snapshot(row: sqlite3.Row) -> Snapshot:
    return Snapshot(id=row["id"], name=row["name"], source_volume_id=row["source"],
                    size_bytes=int(row["size"]), created_ns=int(row["created_ns"]),
                    layer=row["layer"], ready=bool(row["ready"]),
                    parameters=_parameters(row["parameters"]),
                    indications=_indications(row["indications"]), group_id=row["group_id"])
