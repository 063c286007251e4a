package ipalloc_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/ipalloc"
)

// TestWaitingIsNeverSilent: a peer that waits for consensus says so every
// WarnTicks, naming the quorum and what to do (Weave waits silently,
// WEAVE.md §7.1).
func TestWaitingIsNeverSilent(t *testing.T) {
	var warnings []string
	n, err := ipalloc.New(ipalloc.Config{Self: 0x0a0000000001, Universe: slash24, Quorum: 2, WarnTicks: 300,
		Rand:  rand.New(rand.NewPCG(1, 1)),
		Warnf: func(f string, a ...any) { warnings = append(warnings, fmt.Sprintf(f, a...)) }}, nil)
	if err != nil {
		t.Fatal(err)
	}
	n.Submit(ipalloc.Request{ID: 1, Op: ipalloc.OpAlloc, Ident: "c1"})
	if got := n.Status().Status; got != "awaiting consensus (quorum: 2, known: 1)" {
		t.Fatalf("status %q", got)
	}
	for range 299 {
		n.Tick()
	}
	if len(warnings) != 0 {
		t.Fatalf("warned before 30 s: %q", warnings)
	}
	for range 601 {
		n.Tick()
	}
	if len(warnings) != 3 {
		t.Fatalf("after 90 s of ticks: %d warnings, want 3: %q", len(warnings), warnings)
	}
	if w := warnings[0]; !strings.Contains(w, "waited 30s") || !strings.Contains(w, "quorum: 2, known: 1") || !strings.Contains(w, "--init-peer-count") {
		t.Errorf("the warning does not say what is missing and how to fix it: %q", w)
	}
}
