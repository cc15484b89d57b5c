#!/usr/bin/env bash
# Regenerate the Python gRPC stubs in csidriver/pb/ from proto/*.proto.
#
# Usage: hack/gen-proto.sh [OUTPUT_ROOT]
#
# OUTPUT_ROOT defaults to the repository root; the stubs land in
# OUTPUT_ROOT/csidriver/pb/. tests/test_proto.py generates into a temp
# dir and compares with the committed stubs, so run this after editing
# any .proto file and commit the result.
#
# protoc's virtual path mapping (-Icsidriver/pb=proto) makes the .proto
# files live at csidriver/pb/*.proto, so the generated modules import each
# other as `from csidriver.pb import csi_pb2`.
#
# Needs grpcio-tools (pinned in pyproject.toml: the output depends on the
# exact protoc version). Uses ${PYTHON:-python3}.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_root="${1:-$repo_root}"
python="${PYTHON:-python3}"

protos=(proto/csi.proto proto/qsnap.proto)

mkdir -p "$out_root/csidriver/pb"
out_root="$(cd "$out_root" && pwd)"

if ! "$python" -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "gen-proto: grpc_tools not importable with $python;" \
       "install grpcio-tools (see pyproject.toml [test] extra)" >&2
  exit 1
fi

# Drop previous outputs so a removed .proto leaves no stale module behind.
rm -f "$out_root"/csidriver/pb/*_pb2.py \
      "$out_root"/csidriver/pb/*_pb2.pyi \
      "$out_root"/csidriver/pb/*_pb2_grpc.py

cd "$repo_root"
"$python" -m grpc_tools.protoc \
  -Icsidriver/pb=proto \
  --python_out="$out_root" \
  --pyi_out="$out_root" \
  --grpc_python_out="$out_root" \
  "${protos[@]}"
