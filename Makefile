# overlayd: `make build`, `make test`, `make demo`; see README.md.
GO ?= go

.PHONY: build test demo bench fuzz clean

build:
	$(GO) build -o bin/ ./cmd/overlayd ./cmd/overlayctl

test:
	./scripts/test.sh

demo: build
	./scripts/demo.sh

# Throughput and latency against other tunnels (never alongside builds or tests).
bench: build
	../shared/bench/lab.sh compare overlayd wggo direct

# Explore each fuzz target (FUZZ, a regexp, picks some) for FUZZTIME
# (default 10m, the campaign of RELIABILITY.md), then keep what the fuzzer
# found interesting in the target's testdata, where `go test` replays it.
FUZZTIME ?= 10m
FUZZ ?= .
FUZZPKGS = ./fuzz ./cmd/overlayd
fuzz:
	for p in $(FUZZPKGS); do \
		for f in $$($(GO) test $$p -list 'Fuzz.*' | grep ^Fuzz | grep -E '$(FUZZ)'); do \
			$(GO) test $$p -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) || exit 1; \
			mkdir -p $$p/testdata/fuzz/$$f; \
			cp -n "$$($(GO) env GOCACHE)/fuzz/github.com/overlayd/overlayd/$${p#./}/$$f/"* $$p/testdata/fuzz/$$f/ 2>/dev/null || true; \
		done; done

clean:
	rm -rf bin
