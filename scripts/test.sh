#!/usr/bin/env bash
# test.sh: every test of the project: unit, property, fuzz seed corpora,
# meta tests, and the end-to-end tests that run the real binaries in network
# namespaces (root needed; with CI=true they fail rather than skip without
# it). The daemons under test are built with the race detector.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
go vet ./...
OVERLAYD_RACE=1 go test -race -count=1 -timeout 15m ./...
