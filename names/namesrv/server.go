// Package namesrv runs the name store (package names) for overlayd: one
// goroutine owns the Store, feeds it ticks, peer messages, local changes
// and the set of reachable peers, and carries out its Ready in order: save
// the local entries (temporary file, fsync, rename), send the messages,
// publish the new View for the resolver. It decides nothing.
package namesrv

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/overlayd/overlayd/internal/atomicfile"
	"github.com/overlayd/overlayd/internal/coreloop"
	"github.com/overlayd/overlayd/internal/logx"
	"github.com/overlayd/overlayd/names"
	"github.com/overlayd/overlayd/proto"
)

// StateFile is the name of the local entries in the state directory.
const StateFile = "dns.state"

// Router is what the server needs of the router.
type Router interface {
	// Send queues a message for one peer on the names channel and
	// Broadcast one for every reachable peer. Neither blocks: false
	// means the message was dropped (the queue is full), which the
	// store's protocol tolerates, as it tolerates loss.
	Send(dst proto.PeerName, payload []byte) bool
	Broadcast(payload []byte) bool
	// Reachable lists the peers we can send to now.
	Reachable() []proto.PeerName
}

// Config configures a Server.
type Config struct {
	Store     names.Config // Rand, TickMillis and Infof are filled in
	StateDir  string
	TickEvery time.Duration // 100 ms
	// Tombstones is how long a deleted name's tombstone is kept (30
	// minutes when zero): what the store holds grows with the names
	// deleted in that time.
	Tombstones time.Duration
	Router     Router
	Rand       *rand.Rand
	Log        *zap.Logger
}

// inboundLen bounds the peer messages waiting for the server, and
// inboundBytes their bytes (a few of the largest).
const (
	inboundLen   = 1024
	inboundBytes = 4 * maxPayload
)

// maxPayload is the largest name message: MaxNameEntries entries with the
// longest hostname and container ID. Larger payloads are refused before
// they are queued.
const maxPayload = 3 + proto.MaxNameEntries*(21+proto.MaxHostnameLen+proto.MaxContainerLen)

type inbound struct {
	from    proto.PeerName
	payload []byte
}

// Server owns a names.Store. Make one with New, then call Run.
type Server struct {
	cfg   Config
	path  string
	store *names.Store
	log   *zap.Logger
	view  atomic.Pointer[names.View]
	in    chan inbound
	// budget bounds the bytes in in.
	budget *coreloop.Budget
	calls  chan func() // run on Run's goroutine
	// stopped is closed when Run returns.
	stopped chan struct{}

	reach []proto.PeerName // only Run's goroutine touches it

	Dropped  atomic.Uint64 // peer messages dropped: the server lagged
	Rejected atomic.Uint64 // peer messages refused: undecodable or against the rules
	// Forged counts entries refused in password mode: not signed by their
	// origin, or its key not known yet (names.Stats.Forged).
	Forged atomic.Uint64
	// NotOrigin counts entries refused in plaintext mode: sent by another
	// peer than their origin (names.Stats.NotOrigin).
	NotOrigin atomic.Uint64
}

// ErrStopped is returned by calls once Run has ended.
var ErrStopped = errors.New("namesrv: the name server has stopped")

// New reads the saved entries, if any, and makes the Store. A saved state
// that cannot be read is an error naming the file: it is never replaced
// silently.
func New(cfg Config) (*Server, error) {
	if cfg.TickEvery == 0 {
		cfg.TickEvery = 100 * time.Millisecond
	}
	log := cfg.Log
	path := filepath.Join(cfg.StateDir, StateFile)
	state, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		state = nil
	case err != nil:
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	sc := cfg.Store
	sc.Rand = cfg.Rand
	sc.TickMillis = int(cfg.TickEvery / time.Millisecond)
	if cfg.Tombstones > 0 {
		sc.TombstoneTicks = int(max(1, cfg.Tombstones/cfg.TickEvery))
	}
	sc.Infof = logx.Printf(log, zapcore.InfoLevel)
	st, err := names.New(sc, state)
	if err != nil {
		if state != nil {
			return nil, fmt.Errorf("%s: %w: restore it, or remove it to start without the names it held", path, err)
		}
		return nil, err
	}
	s := &Server{cfg: cfg, path: path, store: st, log: log,
		in: make(chan inbound, inboundLen), budget: coreloop.NewBudget(inboundBytes), calls: make(chan func()), stopped: make(chan struct{})}
	s.view.Store(st.View())
	if all, _ := st.View().Live(); all > 0 {
		log.Info(fmt.Sprintf("restored %d names from %s", all, path))
	}
	return s, nil
}

// View is the current lookup view; safe for concurrent use.
func (s *Server) View() *names.View { return s.view.Load() }

// Domain is the served domain.
func (s *Server) Domain() string { return s.store.Domain() }

// Deliver hands the server a message from a peer. It never blocks: when
// the server lags, the message is dropped and counted (gossip tolerates
// loss).
func (s *Server) Deliver(from proto.PeerName, payload []byte) {
	if len(payload) > maxPayload {
		s.Rejected.Add(1)
		return
	}
	if !s.budget.Take(len(payload)) {
		s.Dropped.Add(1)
		return
	}
	select {
	case s.in <- inbound{from, payload}:
	default:
		s.budget.Give(len(payload))
		s.Dropped.Add(1)
	}
}

// do runs f on the server's goroutine and waits until what it changed is
// saved, sent and visible in View.
func (s *Server) do(ctx context.Context, f func(*names.Store)) error {
	done := make(chan error, 1)
	call := func() {
		f(s.store)
		done <- s.apply(ctx)
	}
	select {
	case s.calls <- call:
	case <-ctx.Done():
		return ctx.Err()
	case <-s.stopped:
		return ErrStopped
	}
	select {
	case err := <-done:
		return err
	case <-s.stopped:
		select {
		case err := <-done:
			return err
		default:
		}
		return ErrStopped
	}
}

// RefusedError is the store's refusal of a request (an error of
// names.Store's Add, Delete or FQDN): the request's fault, not the
// server's. Other errors of Add and Delete are the server's: a state that
// could not be saved, a server that stopped, a context that ended.
type RefusedError struct{ Err error }

func (e *RefusedError) Error() string { return e.Err.Error() }
func (e *RefusedError) Unwrap() error { return e.Err }

func refused(err error) error {
	if err == nil {
		return nil
	}
	return &RefusedError{Err: err}
}

// Add registers a name at this peer (names.Store.Add).
func (s *Server) Add(ctx context.Context, hostname string, addr netip.Addr, id string) (e proto.NameEntry, err error) {
	if derr := s.do(ctx, func(st *names.Store) { e, err = st.Add(hostname, addr, id) }); derr != nil {
		return e, derr
	}
	return e, refused(err)
}

// Delete removes names of this peer (names.Store.Delete).
func (s *Server) Delete(ctx context.Context, hostname string, addr netip.Addr, id string) (es []proto.NameEntry, err error) {
	if derr := s.do(ctx, func(st *names.Store) { es, err = st.Delete(hostname, addr, id) }); derr != nil {
		return nil, derr
	}
	return es, refused(err)
}

// FQDN is the name that Add would register for hostname.
func (s *Server) FQDN(ctx context.Context, hostname string) (fqdn string, err error) {
	if derr := s.do(ctx, func(st *names.Store) { fqdn, err = st.FQDN(hostname) }); derr != nil {
		return "", derr
	}
	return fqdn, refused(err)
}

// Entries lists every entry held, tombstones too (names.Store.Entries).
func (s *Server) Entries(ctx context.Context) (es []proto.NameEntry, err error) {
	err = s.do(ctx, func(st *names.Store) { es = st.Entries() })
	return es, err
}

// Stats returns the store's counters.
func (s *Server) Stats(ctx context.Context) (stats names.Stats, err error) {
	err = s.do(ctx, func(st *names.Store) { stats = st.Stats() })
	return stats, err
}

// Run owns the Store until ctx ends or its state cannot be saved. It is
// the only goroutine that touches the Store.
func (s *Server) Run(ctx context.Context) error {
	defer close(s.stopped)
	s.refreshReach()
	return coreloop.Loop[inbound]{Every: s.cfg.TickEvery, Apply: s.apply, Tick: s.tick, Step: s.step, In: s.in, Calls: s.calls}.Run(ctx)
}

// tick tells the store whom the router reaches, and that time passed.
func (s *Server) tick() {
	s.refreshReach()
	s.store.Tick()
}

// step hands the store a peer's message; one it refuses is counted.
func (s *Server) step(m inbound) {
	s.budget.Give(len(m.payload))
	msg, err := proto.ParseNamesMsg(m.payload)
	if err == nil {
		err = s.store.Step(m.from, &msg)
		st := s.store.Stats()
		s.Forged.Store(st.Forged)
		s.NotOrigin.Store(st.NotOrigin)
	}
	if err != nil {
		s.Rejected.Add(1)
		s.log.Warn("name message refused", zap.Stringer("peer", m.from), zap.Error(err))
	}
}

func (s *Server) refreshReach() {
	r := s.cfg.Router.Reachable()
	if !slices.Equal(r, s.reach) {
		s.reach = r
		s.store.SetReachable(r)
	}
}

// apply carries out the Store's Ready: state first, then messages, then
// the view.
func (s *Server) apply(ctx context.Context) error {
	rd := s.store.Ready()
	if rd.Empty() {
		return nil
	}
	if rd.State != nil {
		if err := atomicfile.Write(s.path, rd.State); err != nil {
			return fmt.Errorf("saving names: %w", err)
		}
	}
	for _, m := range rd.Msgs {
		sent := m.To == 0 && s.cfg.Router.Broadcast(m.Payload) || m.To != 0 && s.cfg.Router.Send(m.To, m.Payload)
		if !sent {
			s.log.Debug("name message dropped: the outbound queue is full", zap.Stringer("peer", m.To))
		}
	}
	if rd.View != nil {
		s.view.Store(rd.View)
	}
	s.store.Advance()
	return nil
}
