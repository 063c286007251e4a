// Package allocsrv runs the allocator core (package ipalloc) for overlayd:
// one goroutine owns the Node, feeds it ticks, peer messages, local
// requests and the set of reachable peers, and carries out its Ready in
// order: save the state (temporary file, fsync, rename), send the
// messages, answer the requests, publish ownership. It decides nothing.
package allocsrv

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/overlayd/overlayd/internal/coreloop"
	"github.com/overlayd/overlayd/internal/logx"
	"github.com/overlayd/overlayd/ipalloc"
	"github.com/overlayd/overlayd/ipalloc/ring"
	"github.com/overlayd/overlayd/proto"
)

// StateFile is the name of the allocator's state in the state directory.
const StateFile = "ipam.state"

// Router is what the server needs of the router.
type Router interface {
	// Send queues a message for one peer on the IPAM channel and
	// Broadcast one for every reachable peer. Neither blocks: false
	// means the message was dropped (the queue is full), which the
	// allocator's protocol tolerates, as it tolerates loss.
	Send(dst proto.PeerName, payload []byte) bool
	Broadcast(payload []byte) bool
	// Reachable lists the peers we can send to now.
	Reachable() []proto.PeerName
	// Nickname is the nickname of a reachable peer, "" if not known.
	Nickname(proto.PeerName) string
}

// Config configures a Server.
type Config struct {
	Node      ipalloc.Config // Rand, Infof and Warnf are filled in
	StateDir  string
	TickEvery time.Duration // 100 ms
	Router    Router
	// Publish is told, on the server's goroutine, who owns the range and
	// which addresses outside it are held here, whenever either changes.
	Publish func(ctx context.Context, owners []ring.Span, manual []netip.Prefix)
	// Lost is told, on the server's goroutine, of addresses given up
	// (ipalloc.Ready.Lost); it must not call the Server.
	Lost func(ctx context.Context, lost []ipalloc.Lost)
	Rand *rand.Rand
	Log  *zap.Logger
}

// inboundLen bounds the peer messages waiting for the server, and
// inboundBytes their bytes.
const (
	inboundLen   = 1024
	inboundBytes = 4 << 20
)

type inbound struct {
	from    proto.PeerName
	payload []byte
}

// Server owns an ipalloc.Node. Make one with New, then call Run.
type Server struct {
	cfg   Config
	store *store
	node  *ipalloc.Node
	log   *zap.Logger
	in    chan inbound
	// budget bounds the bytes in in.
	budget *coreloop.Budget
	calls  chan func() // run on Run's goroutine
	// stopped is closed when Run returns.
	stopped chan struct{}

	// Only Run's goroutine touches these.
	waiting map[uint64]chan ipalloc.Done
	reach   []proto.PeerName
	manual  []netip.Prefix
	owners  []ring.Span

	ids      atomic.Uint64 // of calls
	Dropped  atomic.Uint64 // peer messages dropped: the server lagged
	Rejected atomic.Uint64 // peer messages refused: undecodable or against the rules
}

// ErrStopped is returned by calls once Run has ended.
var ErrStopped = errors.New("allocsrv: the allocator has stopped")

// New reads the saved state, if any, and makes the Node. A state file that
// is corrupt is an error naming it: it is never replaced silently.
func New(cfg Config) (*Server, error) {
	if cfg.TickEvery == 0 {
		cfg.TickEvery = 100 * time.Millisecond
	}
	log := cfg.Log
	st, state, err := openStore(cfg.StateDir, func(msg string) { log.Warn(msg) })
	if err != nil {
		return nil, err
	}
	path := st.snapshot
	nc := cfg.Node
	nc.Rand = cfg.Rand
	nc.TickMillis = int(cfg.TickEvery / time.Millisecond)
	nc.Infof, nc.Warnf = logx.Printf(log, zapcore.InfoLevel), logx.Printf(log, zapcore.WarnLevel)
	n, err := ipalloc.New(nc, state)
	if err != nil {
		st.close()
		if state != nil {
			return nil, fmt.Errorf("state in %s: %w: restore it, or remove it and %s to start without the addresses it held", path, err, JournalFile)
		}
		return nil, err
	}
	return &Server{cfg: cfg, store: st, node: n, log: log,
		in: make(chan inbound, inboundLen), budget: coreloop.NewBudget(inboundBytes), calls: make(chan func()), stopped: make(chan struct{}),
		waiting: map[uint64]chan ipalloc.Done{}}, nil
}

// Deliver hands the server a message from a peer. It never blocks: when
// the server lags, the message is dropped and counted (gossip tolerates
// loss).
func (s *Server) Deliver(from proto.PeerName, payload []byte) {
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

// Do submits a request and waits for its answer. If ctx ends first, the
// request is cancelled.
func (s *Server) Do(ctx context.Context, req ipalloc.Request) (ipalloc.Done, error) {
	req.ID = s.ids.Add(1)
	done := make(chan ipalloc.Done, 1)
	if err := s.post(ctx, func() {
		s.waiting[req.ID] = done
		s.node.Submit(req)
	}); err != nil {
		return ipalloc.Done{}, err
	}
	select {
	case d := <-done:
		return d, nil
	case <-ctx.Done():
		select {
		case d := <-done: // answered just as the caller gave up: the answer stands
			return d, nil
		default:
		}
		// The request is cancelled, whatever the caller's context.
		s.post(context.Background(), func() {
			delete(s.waiting, req.ID)
			s.node.Cancel(req.ID)
		})
		return ipalloc.Done{}, ctx.Err()
	case <-s.stopped:
		select {
		case d := <-done: // answered just as Run ended: the answer stands
			return d, nil
		default:
		}
		return ipalloc.Done{}, ErrStopped
	}
}

// Status reports the allocator's state.
func (s *Server) Status(ctx context.Context) (ipalloc.Status, error) {
	ch := make(chan ipalloc.Status, 1)
	if err := s.post(ctx, func() { ch <- s.node.Status() }); err != nil {
		return ipalloc.Status{}, err
	}
	select {
	case st := <-ch:
		return st, nil
	case <-s.stopped:
		return ipalloc.Status{}, ErrStopped
	}
}

// post hands f to Run's goroutine.
func (s *Server) post(ctx context.Context, f func()) error {
	select {
	case s.calls <- f:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-s.stopped:
		return ErrStopped
	}
}

// Close releases the state files of a Server whose Run was never called.
func (s *Server) Close() { s.store.close() }

// Run owns the Node until ctx ends or its state cannot be saved. It is the
// only goroutine that touches the Node and the waiting calls.
func (s *Server) Run(ctx context.Context) error {
	defer close(s.stopped)
	defer func() {
		// A clean stop leaves the whole state in the snapshot.
		if err := s.store.compact(); err != nil {
			s.log.Error("saving the allocator's state at exit", zap.Error(err))
		}
		s.store.close()
	}()
	s.refreshReach()
	return coreloop.Loop[inbound]{Every: s.cfg.TickEvery, Apply: s.apply, Tick: s.tick, Step: s.step, In: s.in, Calls: s.calls}.Run(ctx)
}

// tick tells the Node whom the router reaches, and that time passed.
func (s *Server) tick() {
	s.refreshReach()
	s.node.Tick()
}

// step hands the Node a peer's message; one it refuses is counted.
func (s *Server) step(m inbound) {
	s.budget.Give(len(m.payload))
	msg, err := proto.ParseIPAMMsg(m.payload)
	if err == nil {
		err = s.node.Step(m.from, &msg)
	}
	if err != nil {
		s.Rejected.Add(1)
		s.log.Warn("IPAM message refused", zap.Stringer("peer", m.from), zap.Error(err))
	}
}

func (s *Server) refreshReach() {
	r := s.cfg.Router.Reachable()
	if !slices.Equal(r, s.reach) {
		s.reach = r
		s.node.SetReachable(r)
	}
	// A peer's topology entry, with its nickname, may come after the
	// peer is reachable: asked every tick, told when it changes.
	for _, p := range r {
		s.node.SetNickname(p, s.cfg.Router.Nickname(p))
	}
}

// apply carries out the Node's Ready: state first, then messages, then
// answers, then ownership.
func (s *Server) apply(ctx context.Context) error {
	for range 64 {
		rd := s.node.Ready()
		if rd.Empty() {
			return nil
		}
		if rd.State != nil {
			if err := s.store.save(rd.State); err != nil {
				return fmt.Errorf("saving the allocator's state: %w", err)
			}
		}
		for _, m := range rd.Msgs {
			sent := m.To == 0 && s.cfg.Router.Broadcast(m.Payload) || m.To != 0 && s.cfg.Router.Send(m.To, m.Payload)
			if !sent {
				s.log.Debug("IPAM message dropped: the outbound queue is full", zap.Stringer("peer", m.To))
			}
		}
		for _, d := range rd.Done {
			if ch, ok := s.waiting[d.ID]; ok {
				delete(s.waiting, d.ID)
				ch <- d
			}
		}
		if rd.Owners != nil {
			s.owners = rd.Owners
		}
		if rd.ManualChanged {
			s.manual = rd.Manual
		}
		if (rd.Owners != nil || rd.ManualChanged) && s.cfg.Publish != nil {
			s.cfg.Publish(ctx, s.owners, s.manual)
		}
		if len(rd.Lost) > 0 && s.cfg.Lost != nil {
			s.cfg.Lost(ctx, rd.Lost)
		}
		s.node.Advance()
	}
	return nil
}
