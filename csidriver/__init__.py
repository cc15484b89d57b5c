"""qsnap's CSI driver: gRPC servicers over the engine, and the qsnap CLI."""
