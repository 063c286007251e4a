// Package conn provides overlayd's batched UDP socket: one recvmmsg or
// sendmmsg system call moves a whole batch of datagrams, and after a reader
// or sender is made nothing is allocated per datagram or per batch.
//
// The flow:
//
//  1. Listen opens one dual-stack UDP socket (IPv4 peers appear as plain IPv4
//     addresses) or, where IPv6 is unavailable, an IPv4 one.
//  2. Each goroutine that receives owns a Reader; each that sends owns a
//     Sender. They hold the mmsghdr, iovec and sockaddr arrays the system
//     calls need, so they must not be shared between goroutines.
//  3. Read and Send wait for the socket through Go's netpoller (RawConn), so
//     a blocked reader parks its goroutine, not an OS thread.
//  4. Every datagram read reports the local address it was sent to
//     (IPV6_PKTINFO / IP_PKTINFO), and a send can name the local address to
//     send from: on a host with several addresses, a peer that dialled one
//     of them hears back from that same address.
//  5. Where the kernel has UDP GSO (UDP_SEGMENT, Linux 4.18), a Sender hands
//     runs of equal-sized datagrams to one destination as one message: the
//     datagrams stay in their own buffers (one iovec each) and the kernel
//     cuts them apart late, so the stack is crossed once per run instead of
//     once per datagram. If the kernel refuses (EIO: the device lacks
//     checksum offload), the socket stops using GSO and sends them one by
//     one, as it does without the feature.
//  6. Where the kernel has UDP GRO (Linux 5.0), the socket asks for it: a
//     run of datagrams of one flow comes up as one message, so the stack is
//     crossed once per run on receive too. A Reader receives such messages
//     into buffers of its own and hands their datagrams out one per caller
//     buffer (a copy), keeping what does not fit for the next Read.
package conn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// socketBufferBytes is the size asked for each socket buffer, as wireguard-go
// does: big enough to absorb a burst while a reader is descheduled.
const socketBufferBytes = 7 << 20

// A PacketConn is a batched datagram socket. Readers and Senders made from it
// belong to one goroutine each; Close may be called from any goroutine and
// makes blocked Reads return net.ErrClosed.
type PacketConn interface {
	NewReader(batch int) Reader
	NewSender(batch int) Sender
	LocalPort() uint16
	// GSO reports whether Senders coalesce datagrams with UDP GSO, GRO
	// whether Readers receive runs of datagrams as one message.
	GSO() bool
	GRO() bool
	Close() error
}

// Endpoint is the path of a datagram: the remote address and port, and our
// local address on that path.
type Endpoint struct {
	Remote netip.AddrPort
	// Local is the address the peer sent to, and the one to send from; the
	// zero Addr lets the kernel choose.
	Local netip.Addr
}

// A Reader receives batches of datagrams. Not safe for concurrent use.
type Reader interface {
	// Read fills bufs[i][:sizes[i]] with datagrams that came along eps[i],
	// for i < n. It blocks until at least one datagram arrives. A datagram
	// longer than its buffer is reported with size 0.
	Read(bufs [][]byte, sizes []int, eps []Endpoint) (n int, err error)
}

// A Sender sends batches of datagrams. Not safe for concurrent use.
type Sender interface {
	// Send sends every buffer in bufs as one datagram to to and returns how
	// many the kernel took. A datagram the kernel refuses (too big, no
	// route) is skipped and the rest are still sent; err is the first such
	// failure. The caller owns bufs again as soon as Send returns.
	Send(bufs [][]byte, to Endpoint) (sent int, err error)
}

// UDP is a PacketConn on a real UDP socket.
type UDP struct {
	conn *net.UDPConn
	rc   syscall.RawConn
	v6   bool // the socket is AF_INET6 (dual-stack)
	port uint16
	// gso says Senders coalesce runs of datagrams with UDP_SEGMENT; it is
	// cleared for good when the kernel refuses a coalesced send.
	gso atomic.Bool
	// gro says the socket has UDP_GRO on: a read may return several
	// datagrams in one message. Fixed before the first Reader is made.
	gro bool
}

// OffloadEnv limits the UDP offloads the socket uses where the kernel has
// them: "off" none, "gso" or "gro" only that one; unset (or anything else)
// both. To compare, or to work around a broken driver.
const OffloadEnv = "OVERLAYD_UDP_OFFLOAD"

// GSO reports whether Senders coalesce datagrams with UDP GSO.
func (u *UDP) GSO() bool { return u.gso.Load() }

// DisableGSO makes Senders send every datagram as a message of its own.
func (u *UDP) DisableGSO() { u.gso.Store(false) }

// GRO reports whether the socket receives runs of datagrams as one message.
func (u *UDP) GRO() bool { return u.gro }

// DisableGRO turns UDP GRO off; only before the first Reader is made.
func (u *UDP) DisableGRO() error {
	if !u.gro {
		return nil
	}
	var serr error
	if err := u.rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 0)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("conn: turning UDP GRO off: %w", serr)
	}
	u.gro = false
	return nil
}

var _ PacketConn = (*UDP)(nil)

// Listen opens a UDP socket on port (0 picks a free one) on every address.
func Listen(port uint16) (*UDP, error) {
	lc := net.ListenConfig{Control: func(network, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			// The FORCE variants pass the sysctl limits (root only); the
			// plain ones are the best an unprivileged process gets.
			for _, opt := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
				if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[0], socketBufferBytes) != nil {
					_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt[1], socketBufferBytes)
				}
			}
			// Learn the local address of every datagram (for IPv4 on a
			// dual-stack socket the kernel reports it v4-mapped).
			if network == "udp4" {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	v6 := true
	pc, err := lc.ListenPacket(context.Background(), "udp", fmt.Sprintf("[::]:%d", port))
	if errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EADDRNOTAVAIL) {
		// No IPv6 in this namespace: fall back to IPv4 only.
		v6 = false
		pc, err = lc.ListenPacket(context.Background(), "udp4", fmt.Sprintf("0.0.0.0:%d", port))
	}
	if err != nil {
		return nil, fmt.Errorf("conn: listening on UDP port %d: %w", port, err)
	}
	c := pc.(*net.UDPConn)
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("conn: %w", err)
	}
	la := c.LocalAddr().(*net.UDPAddr)
	u := &UDP{conn: c, rc: rc, v6: v6, port: uint16(la.Port)}
	env := os.Getenv(OffloadEnv)
	_ = rc.Control(func(fd uintptr) {
		if env != "off" && env != "gro" {
			_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
			u.gso.Store(err == nil)
		}
		if env != "off" && env != "gso" {
			u.gro = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
		}
	})
	return u, nil
}

// SetMark makes the socket's packets carry mark (SO_MARK), for policy
// routing; 0 is no mark.
func (u *UDP) SetMark(mark uint32) error {
	var serr error
	if err := u.rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("conn: setting the socket's mark: %w", serr)
	}
	return nil
}

// LocalPort is the port the socket is bound to.
func (u *UDP) LocalPort() uint16 { return u.port }

// Close closes the socket; blocked Reads return net.ErrClosed.
func (u *UDP) Close() error { return u.conn.Close() }

// mmsgs holds the arrays one batched system call needs.
type mmsgs struct {
	u     *UDP
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // big enough for either family
	oob   []byte                  // oobLen bytes of control messages per message
	oobN  int                     // that length
	count int                     // messages offered to the current call
	n     int                     // messages the call handled
	errno syscall.Errno
	fn    func(fd uintptr) bool // made once, so no call allocates a closure
}

// oobLen holds one packet-info control message of either family;
// sendOOBLen one of those and a GSO segment size (a uint16), groOOBLen one
// of those and a GRO segment size (an int).
var (
	oobLen     = unix.CmsgSpace(unix.SizeofInet6Pktinfo)
	sendOOBLen = oobLen + unix.CmsgSpace(2)
	groOOBLen  = oobLen + unix.CmsgSpace(4)
)

// newMmsgs makes the arrays for batch messages of system call trap
// (recvmmsg or sendmmsg), with oobN bytes of control messages each.
func newMmsgs(u *UDP, batch, oobN int, trap uintptr) *mmsgs {
	if batch < 1 {
		batch = 1
	}
	m := &mmsgs{
		u:     u,
		hdrs:  make([]unix.Mmsghdr, batch),
		iovs:  make([]unix.Iovec, batch),
		names: make([]unix.RawSockaddrInet6, batch),
		oob:   make([]byte, batch*oobN),
		oobN:  oobN,
	}
	m.fn = func(fd uintptr) bool { return m.call(trap, fd) }
	return m
}

// endpoint is the path message i of the last recvmmsg came along, and its
// GRO segment size (0: one datagram).
func (m *mmsgs) endpoint(i int) (Endpoint, int) {
	local, seg := parseControl(m.oob[i*m.oobN : i*m.oobN+int(m.hdrs[i].Hdr.Controllen)])
	return Endpoint{Remote: parseSockaddr(&m.names[i]), Local: local}, seg
}

// call runs one recvmmsg or sendmmsg (trap) on fd over the first count
// messages. It reports false, so that RawConn waits and calls again, only
// when the socket is not ready.
func (m *mmsgs) call(trap, fd uintptr) bool {
	var n uintptr
	errno := unix.EINTR
	for errno == unix.EINTR {
		n, _, errno = unix.Syscall6(trap, fd, uintptr(unsafe.Pointer(&m.hdrs[0])),
			uintptr(m.count), unix.MSG_DONTWAIT, 0, 0)
	}
	if errno == unix.EAGAIN {
		return false
	}
	m.n, m.errno = int(n), errno
	return true
}

// udpReader is the Reader of a UDP socket.
type udpReader struct{ *mmsgs }

// groMessages is how many messages a GRO Reader receives per call, each
// up to groBytes long: up to maxSegments datagrams each.
const (
	groMessages = 32
	groBytes    = 1 << 16
)

// NewReader makes a Reader that receives up to batch datagrams per call.
func (u *UDP) NewReader(batch int) Reader {
	if u.gro {
		k := max(1, min(batch, groMessages))
		r := &groReader{mmsgs: newMmsgs(u, k, groOOBLen, unix.SYS_RECVMMSG), big: make([][]byte, k), segs: make([]int, k), eps: make([]Endpoint, k)}
		for i := range r.big {
			r.big[i] = make([]byte, groBytes)
		}
		return r
	}
	return udpReader{newMmsgs(u, batch, oobLen, unix.SYS_RECVMMSG)}
}

func (r udpReader) Read(bufs [][]byte, sizes []int, eps []Endpoint) (int, error) {
	count := min(len(bufs), len(sizes), len(eps), len(r.hdrs))
	if count == 0 {
		return 0, errors.New("conn: Read with no buffers")
	}
	if err := r.recv(bufs[:count]); err != nil {
		return 0, err
	}
	for i := range r.n {
		h := &r.hdrs[i]
		sizes[i] = int(h.Len)
		if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
			sizes[i] = 0
		}
		eps[i], _ = r.endpoint(i)
	}
	return r.n, nil
}

// recv runs one recvmmsg into bufs, one message each.
func (m *mmsgs) recv(bufs [][]byte) error {
	for i, b := range bufs {
		m.iovs[i].Base = &b[0]
		m.iovs[i].SetLen(len(b))
		h := &m.hdrs[i].Hdr
		h.Iov = &m.iovs[i]
		h.SetIovlen(1)
		h.Name = (*byte)(unsafe.Pointer(&m.names[i]))
		h.Namelen = unix.SizeofSockaddrInet6
		h.Control = &m.oob[i*m.oobN]
		h.SetControllen(m.oobN)
		h.Flags = 0
	}
	m.count = len(bufs)
	if err := m.u.rc.Read(m.fn); err != nil {
		return err
	}
	if m.errno != 0 {
		return fmt.Errorf("conn: recvmmsg: %w", m.errno)
	}
	return nil
}

// groReader is the Reader of a socket with UDP GRO: messages, each one
// datagram or a run of them, land in big; Read copies their datagrams out
// one per caller buffer.
type groReader struct {
	*mmsgs
	big  [][]byte
	segs []int      // per message: its datagrams' size (the last may be shorter)
	eps  []Endpoint // per message
	// next is the message whose datagrams Read hands out next, from byte
	// off; messages next..n-1 are still to go.
	next, off int
}

func (r *groReader) Read(bufs [][]byte, sizes []int, eps []Endpoint) (int, error) {
	count := min(len(bufs), len(sizes), len(eps))
	if count == 0 {
		return 0, errors.New("conn: Read with no buffers")
	}
	out := 0
	for out < count {
		if r.next >= r.n {
			if out > 0 {
				break // hand out what we have rather than wait
			}
			if err := r.fill(); err != nil {
				return 0, err
			}
			continue
		}
		m := r.next
		total := int(r.hdrs[m].Len)
		seg := min(r.segs[m], total-r.off)
		if seg <= 0 {
			seg = total - r.off // one datagram (or an empty or cut one)
		}
		d := r.big[m][r.off : r.off+seg]
		if r.hdrs[m].Hdr.Flags&unix.MSG_TRUNC != 0 || len(d) > len(bufs[out]) {
			sizes[out] = 0
		} else {
			sizes[out] = copy(bufs[out], d)
		}
		eps[out] = r.eps[m]
		out++
		if r.off += seg; r.off >= total {
			r.next, r.off = m+1, 0
		}
	}
	return out, nil
}

// fill receives the next messages into big.
func (r *groReader) fill() error {
	r.next, r.off, r.n = 0, 0, 0
	if err := r.recv(r.big); err != nil {
		return err
	}
	for i := range r.n {
		h := &r.hdrs[i]
		r.eps[i], r.segs[i] = r.endpoint(i)
		if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
			r.segs[i], h.Len = 0, 0 // one datagram of size 0
		}
	}
	return nil
}

// udpSender is the Sender of a UDP socket.
type udpSender struct {
	*mmsgs
	segs []int // datagrams in each message of the current call
}

// GSO limits: the kernel takes at most maxSegments datagrams in one
// message (UDP_MAX_SEGMENTS), whose payloads together must fit in one
// IPv4 datagram.
const (
	maxSegments = 64
	maxGSOBytes = 1<<16 - 1 - 20 - 8
)

// NewSender makes a Sender that hands up to batch datagrams to the kernel per
// system call (larger batches take several calls).
func (u *UDP) NewSender(batch int) Sender {
	return udpSender{mmsgs: newMmsgs(u, batch, sendOOBLen, unix.SYS_SENDMMSG), segs: make([]int, max(batch, 1))}
}

func (s udpSender) Send(bufs [][]byte, to Endpoint) (sent int, err error) {
	namelen, err := s.putSockaddr(to.Remote)
	if err != nil {
		return 0, err
	}
	// Every message carries the same packet info; GSO messages add their
	// segment size after it.
	pkt := s.putPktinfo(to, s.oob[:s.oobN])
	single := 0 // datagrams to send one per message before coalescing again
	for len(bufs) > 0 {
		gso := s.u.gso.Load()
		avail := min(len(bufs), len(s.iovs))
		count, used := 0, 0
		for used < avail {
			n := 1
			if gso && used >= single {
				n = run(bufs[used:avail])
			}
			for k := range n {
				b := bufs[used+k]
				if len(b) == 0 {
					s.iovs[used+k].Base = nil
				} else {
					s.iovs[used+k].Base = &b[0]
				}
				s.iovs[used+k].SetLen(len(b))
			}
			h := &s.hdrs[count].Hdr
			h.Iov = &s.iovs[used]
			h.SetIovlen(n)
			h.Name = (*byte)(unsafe.Pointer(&s.names[0]))
			h.Namelen = namelen
			oob := s.oob[count*s.oobN : (count+1)*s.oobN]
			if count > 0 {
				copy(oob, s.oob[:pkt])
			}
			olen := pkt
			if n > 1 {
				olen += putSegment(oob[pkt:], uint16(len(bufs[used])))
			}
			if olen > 0 {
				h.Control = &oob[0]
			} else {
				h.Control = nil
			}
			h.SetControllen(olen)
			s.segs[count] = n
			count++
			used += n
		}
		s.count = count
		if werr := s.u.rc.Write(s.fn); werr != nil {
			return sent, werr // the socket is closed
		}
		if s.errno != 0 && s.n <= 0 {
			switch {
			case s.errno == unix.EIO && s.segs[0] > 1:
				// The device cannot checksum for us, which GSO needs:
				// never again on this socket.
				s.u.gso.Store(false)
			case s.segs[0] > 1:
				// One datagram of the run may be the bad one, or the
				// run's segments do not fit the path (EINVAL): send the
				// rest of this batch one by one.
				single = len(bufs)
			default:
				// The first datagram failed (too big, no route...): skip
				// it so that one bad datagram does not block the rest.
				if err == nil {
					err = fmt.Errorf("conn: sendmmsg to %v: %w", to.Remote, s.errno)
				}
				bufs = bufs[1:]
				single = max(0, single-1)
			}
			continue
		}
		done := 0
		for _, n := range s.segs[:s.n] {
			done += n
		}
		sent += done
		bufs = bufs[done:]
		single = max(0, single-done)
	}
	return sent, err
}

// run is how many datagrams from the start of bufs go in one GSO message:
// all as long as the first, but the last, which may be shorter; at most
// maxSegments of them and maxGSOBytes in all.
func run(bufs [][]byte) int {
	size := len(bufs[0])
	if size == 0 {
		return 1
	}
	n, total := 1, size
	for n < len(bufs) && n < maxSegments {
		l := len(bufs[n])
		if l == 0 || l > size || total+l > maxGSOBytes {
			break
		}
		n++
		total += l
		if l < size {
			break
		}
	}
	return n
}

// putSegment writes the UDP_SEGMENT control message of a GSO message whose
// datagrams are size bytes long into oob, and returns its length.
func putSegment(oob []byte, size uint16) int {
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	*(*uint16)(unsafe.Pointer(&oob[unix.CmsgLen(0)])) = size // host byte order
	return unix.CmsgSpace(2)
}

// putSockaddr writes to into names[0] in the socket's family.
func (s udpSender) putSockaddr(to netip.AddrPort) (uint32, error) {
	a := to.Addr().Unmap()
	port := to.Port()
	if s.u.v6 {
		sa := &s.names[0]
		*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.As16()}
		p := (*[2]byte)(unsafe.Pointer(&sa.Port))
		p[0], p[1] = byte(port>>8), byte(port)
		return unix.SizeofSockaddrInet6, nil
	}
	if !a.Is4() {
		return 0, fmt.Errorf("conn: cannot send to %v from an IPv4-only socket", to)
	}
	sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&s.names[0]))
	*sa = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.As4()}
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	p[0], p[1] = byte(port>>8), byte(port)
	return unix.SizeofSockaddrInet4, nil
}

// parseSockaddr reads the source address the kernel wrote. IPv4-mapped IPv6
// addresses come back as IPv4.
func parseSockaddr(sa *unix.RawSockaddrInet6) netip.AddrPort {
	p := (*[2]byte)(unsafe.Pointer(&sa.Port))
	port := uint16(p[0])<<8 | uint16(p[1])
	switch sa.Family {
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	}
	return netip.AddrPort{}
}

// putPktinfo writes into oob[:n] the control message that makes the kernel
// send from to.Local, and returns n (0 when Local is not set).
func (s udpSender) putPktinfo(to Endpoint, oob []byte) int {
	local := to.Local.Unmap()
	if !local.IsValid() || local.IsUnspecified() {
		return 0
	}
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	data := oob[unix.CmsgLen(0):]
	if local.Is4() {
		// IP_PKTINFO works on an AF_INET6 socket too, for IPv4 peers.
		h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
		pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
		*pi = unix.Inet4Pktinfo{Spec_dst: local.As4()}
		return unix.CmsgSpace(unix.SizeofInet4Pktinfo)
	}
	if !s.u.v6 {
		return 0
	}
	h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
	h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
	pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
	*pi = unix.Inet6Pktinfo{Addr: local.As16()}
	return unix.CmsgSpace(unix.SizeofInet6Pktinfo)
}

// parseControl finds, in the control messages the kernel wrote for one
// message, the destination address (the zero Addr if there is none) and
// the GRO segment size (0 if there is none). It walks the bytes itself, so
// that it does not allocate.
func parseControl(oob []byte) (local netip.Addr, seg int) {
	for len(oob) >= unix.CmsgLen(0) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		n := int(h.Len)
		if n < unix.CmsgLen(0) || n > len(oob) {
			return local, seg
		}
		data := oob[unix.CmsgLen(0):n]
		switch {
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
			local = netip.AddrFrom16(pi.Addr).Unmap()
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
			local = netip.AddrFrom4(pi.Addr)
		case h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && len(data) >= 4:
			seg = int(*(*int32)(unsafe.Pointer(&data[0]))) // host byte order
		}
		next := unix.CmsgSpace(n - unix.CmsgLen(0))
		if next > len(oob) {
			return local, seg
		}
		oob = oob[next:]
	}
	return local, seg
}
