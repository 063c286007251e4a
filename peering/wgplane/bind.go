package wgplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	wgconn "golang.zx2c4.com/wireguard/conn"

	"github.com/overlayd/overlayd/peering/conn"
)

// bind carries the WireGuard device's datagrams on overlayd's own batched
// socket (peering/conn): UDP GSO and GRO as the plaintext path has them, and
// no allocation per datagram. wireguard-go's standard bind allocates an
// address and an endpoint for every datagram it receives.
//
// A received datagram's endpoint comes from a cache keyed by its path, so
// the same peer on the same path is the same *endpoint every time. The cache
// is read and written only by the one receive function; a full cache is
// emptied rather than grown, so datagrams from ever new addresses cost an
// allocation each but never unbounded memory.
type bind struct {
	mu   sync.Mutex // guards pc, recv and mark across Open and Close
	pc   *conn.UDP
	recv *receiver // the receive function of pc
	mark uint32
	// senders holds pc's conn.Senders, each used by one Send at a time;
	// nil while closed. Send reads it without the lock.
	senders atomic.Pointer[sync.Pool]
}

var _ wgconn.Bind = (*bind)(nil)

// bindBatch is the number of datagrams per receive and the most per send,
// as wireguard-go's own bind takes.
const bindBatch = wgconn.IdealBatchSize

// maxCachedEndpoints bounds the receive side's endpoint cache.
const maxCachedEndpoints = 1024

func newBind() *bind { return &bind{} }

// Open implements conn.Bind.
func (b *bind) Open(port uint16) ([]wgconn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc != nil {
		return nil, 0, wgconn.ErrBindAlreadyOpen
	}
	pc, err := conn.Listen(port)
	if err != nil {
		return nil, 0, err
	}
	if b.mark != 0 {
		if err := pc.SetMark(b.mark); err != nil {
			pc.Close()
			return nil, 0, err
		}
	}
	b.pc = pc
	b.senders.Store(&sync.Pool{New: func() any { return pc.NewSender(bindBatch) }})
	b.recv = &receiver{rd: pc.NewReader(bindBatch), eps: make([]conn.Endpoint, bindBatch), cache: map[conn.Endpoint]*endpoint{}}
	return []wgconn.ReceiveFunc{b.recv.receive}, pc.LocalPort(), nil
}

// receiver is the receive function of one Open: its reader, and the
// endpoints of the paths datagrams came along.
type receiver struct {
	rd    conn.Reader
	eps   []conn.Endpoint
	cache map[conn.Endpoint]*endpoint
}

func (r *receiver) receive(bufs [][]byte, sizes []int, eps []wgconn.Endpoint) (int, error) {
	n, err := r.rd.Read(bufs, sizes, r.eps[:min(len(r.eps), len(eps))])
	for i := range n {
		e := r.cache[r.eps[i]]
		if e == nil {
			if len(r.cache) >= maxCachedEndpoints {
				clear(r.cache)
			}
			e = &endpoint{Endpoint: r.eps[i]}
			r.cache[r.eps[i]] = e
		} else if e.srcCleared.Load() {
			e.srcCleared.Store(false) // the path is in use again
		}
		eps[i] = e
	}
	return n, err
}

// cachedEndpoints is the size of the endpoint cache (for tests); only
// while no receive runs.
func (b *bind) cachedEndpoints() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.recv.cache)
}

// Close implements conn.Bind: the receive function returns net.ErrClosed.
func (b *bind) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc == nil {
		return nil
	}
	err := b.pc.Close()
	b.pc = nil // recv stays: its function returns net.ErrClosed
	b.senders.Store(nil)
	return err
}

// SetMark implements conn.Bind: the socket's packets carry mark (SO_MARK).
func (b *bind) SetMark(mark uint32) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.mark = mark
	if b.pc == nil {
		return nil
	}
	return b.pc.SetMark(mark)
}

// Send implements conn.Bind.
func (b *bind) Send(bufs [][]byte, ep wgconn.Endpoint) error {
	e, ok := ep.(*endpoint)
	if !ok {
		return fmt.Errorf("wgplane: endpoint of type %T", ep)
	}
	pool := b.senders.Load() // a Send racing Close puts its sender back in the old pool
	if pool == nil {
		return net.ErrClosed
	}
	s := pool.Get().(conn.Sender)
	to := e.Endpoint
	if e.srcCleared.Load() {
		to.Local = netip.Addr{}
	}
	sent, err := s.Send(bufs, to)
	pool.Put(s)
	if err == nil && sent < len(bufs) {
		err = errors.New("wgplane: the socket took only part of a batch")
	}
	return err
}

// ParseEndpoint implements conn.Bind: s is "IP:port".
func (b *bind) ParseEndpoint(s string) (wgconn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, err
	}
	return &endpoint{Endpoint: conn.Endpoint{Remote: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}}, nil
}

// BatchSize implements conn.Bind.
func (b *bind) BatchSize() int { return bindBatch }

// endpoint is a path to a peer: its address, and the local address to send
// from (learnt from the datagrams it sent us) unless ClearSrc dropped it.
type endpoint struct {
	conn.Endpoint
	srcCleared atomic.Bool
}

var _ wgconn.Endpoint = (*endpoint)(nil)

func (e *endpoint) ClearSrc() { e.srcCleared.Store(true) }

func (e *endpoint) SrcIP() netip.Addr {
	if e.srcCleared.Load() {
		return netip.Addr{}
	}
	return e.Local
}

func (e *endpoint) SrcToString() string {
	if ip := e.SrcIP(); ip.IsValid() {
		return ip.String()
	}
	return ""
}

func (e *endpoint) DstIP() netip.Addr   { return e.Remote.Addr() }
func (e *endpoint) DstToString() string { return e.Remote.String() }
func (e *endpoint) DstToBytes() []byte {
	b, _ := e.Remote.MarshalBinary()
	return b
}
