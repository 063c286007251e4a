#!/usr/bin/env bash
# test.sh: every test of the project: unit, property, fuzz seed corpora,
# meta tests, and the end-to-end tests that run the real binaries in network
# namespaces (root needed; with CI=true they fail rather than skip without
# it), the Docker ones beside the machine's Docker engine, which
# docker-up.sh starts if it is stopped. The daemons under test are built
# with the race detector.
#
# The allocator's simulation (400 random schedules of 50-120 peers here, to
# keep the whole run under 15 minutes on 2 cores) runs without the race
# detector: it is one goroutine per schedule, so the detector has nothing
# to find and would only make it ten times slower.
# Its larger runs: go test ./ipalloc/ipalloctest (1,000 schedules), with
# -schedules 10000 -peers 200 for more.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
./scripts/docker-up.sh
go vet ./...
OVERLAYD_RACE=1 go test -race -count=1 -timeout 15m $(go list ./... | grep -v /ipalloc/ipalloctest)
# The allocation counts again without the detector, whose sync.Pool drops
# buffers on purpose.
go test -count=1 -run 'AllocatesNothing|AllocateNothing' ./peering/... ./proto/...
go test -count=1 -timeout 15m -v ./ipalloc/ipalloctest -schedules 400 | grep -E '^(---|ok|FAIL|panic)|schedules in|replay'
