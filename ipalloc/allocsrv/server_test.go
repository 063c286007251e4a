package allocsrv

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/proto"
)

type loneRouter struct{}

func (loneRouter) Send(proto.PeerName, []byte) bool { return true }
func (loneRouter) Broadcast([]byte) bool            { return true }
func (loneRouter) Reachable() []proto.PeerName      { return nil }
func (loneRouter) Nickname(proto.PeerName) string   { return "" }

func newServer(tb testing.TB, dir string) *Server {
	tb.Helper()
	s, err := New(Config{
		Node:     ipalloc.Config{Self: 1, UID: 1, Universe: netip.MustParsePrefix("10.32.0.0/12")},
		StateDir: dir, Router: loneRouter{}, Rand: rand.New(rand.NewPCG(1, 2)), Log: zap.NewNop(),
	})
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func run(tb testing.TB, s *Server) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Error(err)
		}
	})
}

// TestStateSurvivesRestart: what a Server answered is in its state file
// when the answer comes: a new Server on the same directory gives every ID
// the same address.
func TestStateSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	s := newServer(t, dir)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	got := map[string]netip.Prefix{}
	for i := range 20 {
		id := fmt.Sprintf("c%d", i)
		d, err := s.Do(context.Background(), ipalloc.Request{Op: ipalloc.OpAlloc, Ident: id})
		if err != nil || d.Err != nil {
			t.Fatal(err, d.Err)
		}
		got[id] = d.Addr
	}
	cancel()
	<-done
	s2 := newServer(t, dir)
	run(t, s2)
	for id, want := range got {
		d, err := s2.Do(context.Background(), ipalloc.Request{Op: ipalloc.OpAlloc, Ident: id})
		if err != nil || d.Err != nil || d.Addr != want {
			t.Errorf("%s: %v %v %v, want %v", id, d.Addr, err, d.Err, want)
		}
	}
}

// BenchmarkAlloc is an allocation through the server without the API:
// state saved (fsync) before the answer.
func BenchmarkAlloc(b *testing.B) {
	s := newServer(b, b.TempDir())
	run(b, s)
	b.ResetTimer()
	for i := range b.N {
		if d, err := s.Do(context.Background(), ipalloc.Request{Op: ipalloc.OpAlloc, Ident: fmt.Sprintf("c%d", i)}); err != nil || d.Err != nil {
			b.Fatal(err, d.Err)
		}
	}
}

// TestInboundBytesBounded: messages waiting for the server are bounded in
// bytes, not only in number; taken messages give their bytes back.
func TestInboundBytesBounded(t *testing.T) {
	s := newServer(t, t.TempDir())
	big := make([]byte, 64<<10) // junk: refused when stepped
	for range inboundLen {
		s.Deliver(2, big)
	}
	if fit := inboundBytes / len(big); s.Dropped.Load() != uint64(inboundLen-fit) || s.budget.Queued() != int64(fit*len(big)) {
		t.Fatalf("%d dropped, %d bytes queued; want %d dropped, %d queued", s.Dropped.Load(), s.budget.Queued(), inboundLen-fit, fit*len(big))
	}
	run(t, s)
	for deadline := time.Now().Add(5 * time.Second); s.budget.Queued() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes still queued after the server ran", s.budget.Queued())
		}
	}
	s.Deliver(2, big)
	if s.Dropped.Load() != uint64(inboundLen-inboundBytes/len(big)) {
		t.Errorf("a message after the queue drained was dropped")
	}
}
