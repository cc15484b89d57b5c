"""Generated protobuf/gRPC stubs (csi.v1 and qsnap.v1); do not edit.

Regenerate with hack/gen-proto.sh after changing proto/*.proto.
"""
