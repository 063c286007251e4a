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

# Explore each fuzz target for FUZZTIME (default 30s).
FUZZTIME ?= 30s
fuzz:
	for f in $$($(GO) test ./fuzz -list 'Fuzz.*' | grep ^Fuzz); do \
		$(GO) test ./fuzz -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) || exit 1; done

clean:
	rm -rf bin
