package namesrv

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/proto"
)

// fakeRouter records what is sent, and checks that the state file holds
// every name of ours that a message announces before the message goes.
type fakeRouter struct {
	t     *testing.T
	path  string
	reach []proto.PeerName

	mu   sync.Mutex
	sent []proto.NamesMsg
}

// Broadcast records the message once for each reachable peer, as the
// router sends it.
func (r *fakeRouter) Broadcast(payload []byte) bool {
	for _, p := range r.reach {
		r.Send(p, payload)
	}
	return true
}

func (r *fakeRouter) Send(dst proto.PeerName, payload []byte) bool {
	m, err := proto.ParseNamesMsg(payload)
	if err != nil {
		r.t.Errorf("sent a message that does not parse: %v", err)
	}
	saved, _ := os.ReadFile(r.path)
	es, _ := names.DecodeState(saved)
	for _, e := range m.Entries {
		if e.Origin != 1 {
			continue
		}
		found := false
		for _, s := range es {
			found = found || (s.Hostname == e.Hostname && s.Addr == e.Addr && s.Version == e.Version && s.Tombstone == e.Tombstone)
		}
		if !found {
			r.t.Errorf("%s v%d sent before it was saved", e.Hostname, e.Version)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sent = append(r.sent, m)
	return true
}

func (r *fakeRouter) Reachable() []proto.PeerName { return r.reach }

func newServer(t *testing.T, dir string, r *fakeRouter) (*Server, error) {
	return New(Config{Store: names.Config{Self: 1}, StateDir: dir, Router: r,
		Rand: rand.New(rand.NewPCG(1, 2)), Log: zap.NewNop()})
}

// TestSavedBeforeSentAndRestored: every name is on disk before any peer
// hears of it, visible as soon as Add returns, and a new server on the
// same directory answers for it.
func TestSavedBeforeSentAndRestored(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		r := &fakeRouter{t: t, path: filepath.Join(dir, StateFile), reach: []proto.PeerName{2, 3}}
		s, err := newServer(t, dir, r)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- s.Run(ctx) }()
		a := netip.MustParseAddr("10.32.0.1")
		if _, err := s.Add(ctx, "web1", a, "c1"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Add(ctx, "web2", netip.MustParseAddr("10.32.0.2"), ""); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Delete(ctx, "web2", netip.Addr{}, ""); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Add(ctx, "web.example.com", a, "c1"); err == nil || !strings.Contains(err.Error(), "not a subdomain of weave.local.") {
			t.Errorf("outside the domain: %v", err)
		}
		// Add returns once the name is saved, sent and visible.
		if got := s.View().Lookup("WEB1.weave.local."); len(got) != 1 || got[0] != a {
			t.Errorf("lookup right after Add: %v", got)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		r.mu.Lock()
		n := len(r.sent)
		r.mu.Unlock()
		// Three changes to two peers, and digests.
		if n < 6 {
			t.Errorf("%d messages sent, want the three changes to each of two peers", n)
		}

		s2, err := newServer(t, dir, r)
		if err != nil {
			t.Fatal(err)
		}
		v := s2.View()
		if got := v.Lookup("web1.weave.local."); len(got) != 1 || got[0] != a {
			t.Errorf("after restart: web1 %v", got)
		}
		if got := v.Lookup("web2.weave.local."); len(got) != 0 {
			t.Errorf("after restart: deleted web2 is back: %v", got)
		}
	})
}

// TestBadStateRefused: a damaged state file is an error naming it, and is
// left as it was.
func TestBadStateRefused(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, StateFile)
	if err := os.WriteFile(path, []byte("OVN1 not really"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := newServer(t, dir, &fakeRouter{t: t, path: path})
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("damaged state: %v, want an error naming %s", err, path)
	}
	if b, _ := os.ReadFile(path); string(b) != "OVN1 not really" {
		t.Errorf("state file changed to %q", b)
	}
}

// TestJunkCounted: messages that do not parse or break the rules are
// counted and the server carries on.
func TestJunkCounted(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		r := &fakeRouter{t: t, path: filepath.Join(dir, StateFile), reach: []proto.PeerName{2}}
		s, err := newServer(t, dir, r)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- s.Run(ctx) }()
		s.Deliver(2, []byte{9, 9, 9})
		bad, _ := proto.AppendNamesMsg(nil, &proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{
			{Hostname: "a b.weave.local.", Addr: netip.MustParseAddr("10.0.0.1"), ContainerID: "c", Origin: 2}}})
		s.Deliver(2, bad)
		good, _ := proto.AppendNamesMsg(nil, &proto.NamesMsg{Kind: proto.NamesEntries, Entries: []proto.NameEntry{
			{Hostname: "db.weave.local.", Addr: netip.MustParseAddr("10.0.0.2"), ContainerID: "c", Origin: 2}}})
		time.Sleep(200 * time.Millisecond) // peer 2 becomes reachable on the first tick
		s.Deliver(2, good)
		time.Sleep(200 * time.Millisecond)
		if got := s.Rejected.Load(); got != 2 {
			t.Errorf("rejected %d, want 2", got)
		}
		if got := s.View().Lookup("db.weave.local."); len(got) != 1 {
			t.Errorf("a good message after junk: db is %v", got)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}

// TestInboundBytesBounded: at most inboundBytes of messages wait for the
// server, whatever their number: four of the largest.
func TestInboundBytesBounded(t *testing.T) {
	dir := t.TempDir()
	s, err := newServer(t, dir, &fakeRouter{t: t, path: filepath.Join(dir, StateFile)})
	if err != nil {
		t.Fatal(err)
	}
	big := make([]byte, maxPayload)
	for range 10 {
		s.Deliver(2, big)
	}
	if s.Dropped.Load() != 6 || s.budget.Queued() != 4*maxPayload {
		t.Errorf("%d dropped, %d bytes queued; want 6 dropped, %d queued", s.Dropped.Load(), s.budget.Queued(), 4*maxPayload)
	}
}

// TestTombstoneLifetime: a deleted name's tombstone is listed until
// Config.Tombstones has passed, then dropped.
func TestTombstoneLifetime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		r := &fakeRouter{t: t, path: filepath.Join(dir, StateFile)}
		s, err := New(Config{Store: names.Config{Self: 1}, StateDir: dir, Router: r, Tombstones: time.Minute,
			Rand: rand.New(rand.NewPCG(1, 2)), Log: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan error)
		go func() { done <- s.Run(ctx) }()
		if _, err := s.Add(ctx, "web1", netip.MustParseAddr("10.32.0.1"), "c1"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Delete(ctx, "web1", netip.Addr{}, ""); err != nil {
			t.Fatal(err)
		}
		count := func() int {
			es, err := s.Entries(ctx)
			if err != nil {
				t.Fatal(err)
			}
			return len(es)
		}
		time.Sleep(50 * time.Second)
		if n := count(); n != 1 {
			t.Errorf("50 s after the delete: %d entries, want the tombstone", n)
		}
		time.Sleep(11 * time.Second)
		if n := count(); n != 0 {
			t.Errorf("61 s after the delete: %d entries, want none", n)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}
