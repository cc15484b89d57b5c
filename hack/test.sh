#!/usr/bin/env bash
# Installs the test dependencies (idempotently) and runs the whole test suite.
# Extra arguments go to pytest, e.g. hack/test.sh -k snapshot -x
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/hack/install.sh" --test
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest "$@"
