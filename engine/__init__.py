"""qsnap's storage engine: qcow2 layers in a pool directory, a durable
catalog, and the operations on volumes and snapshots.  No gRPC in here."""
