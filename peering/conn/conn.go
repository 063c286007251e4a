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
package conn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
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
	return &UDP{conn: c, rc: rc, v6: v6, port: uint16(la.Port)}, nil
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
	oob   []byte                  // oobLen bytes of control messages per datagram
	count int                     // messages offered to the current call
	n     int                     // messages the call handled
	errno syscall.Errno
	fn    func(fd uintptr) bool // made once, so no call allocates a closure
}

// oobLen holds one packet-info control message of either family.
var oobLen = unix.CmsgSpace(unix.SizeofInet6Pktinfo)

func newMmsgs(u *UDP, batch int) *mmsgs {
	if batch < 1 {
		batch = 1
	}
	m := &mmsgs{
		u:     u,
		hdrs:  make([]unix.Mmsghdr, batch),
		iovs:  make([]unix.Iovec, batch),
		names: make([]unix.RawSockaddrInet6, batch),
		oob:   make([]byte, batch*oobLen),
	}
	for i := range m.hdrs {
		m.hdrs[i].Hdr.Iov = &m.iovs[i]
		m.hdrs[i].Hdr.SetIovlen(1)
	}
	return m
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

// NewReader makes a Reader that receives up to batch datagrams per call.
func (u *UDP) NewReader(batch int) Reader {
	r := udpReader{newMmsgs(u, batch)}
	r.fn = func(fd uintptr) bool { return r.call(unix.SYS_RECVMMSG, fd) }
	return r
}

func (r udpReader) Read(bufs [][]byte, sizes []int, eps []Endpoint) (int, error) {
	count := min(len(bufs), len(sizes), len(eps), len(r.hdrs))
	if count == 0 {
		return 0, errors.New("conn: Read with no buffers")
	}
	for i := range count {
		r.iovs[i].Base = &bufs[i][0]
		r.iovs[i].SetLen(len(bufs[i]))
		h := &r.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&r.names[i]))
		h.Namelen = unix.SizeofSockaddrInet6
		h.Control = &r.oob[i*oobLen]
		h.SetControllen(oobLen)
		h.Flags = 0
	}
	r.count = count
	if err := r.u.rc.Read(r.fn); err != nil {
		return 0, err
	}
	if r.errno != 0 {
		return 0, fmt.Errorf("conn: recvmmsg: %w", r.errno)
	}
	for i := range r.n {
		h := &r.hdrs[i]
		sizes[i] = int(h.Len)
		if h.Hdr.Flags&unix.MSG_TRUNC != 0 {
			sizes[i] = 0
		}
		eps[i] = Endpoint{
			Remote: parseSockaddr(&r.names[i]),
			Local:  parsePktinfo(r.oob[i*oobLen : i*oobLen+int(h.Hdr.Controllen)]),
		}
	}
	return r.n, nil
}

// udpSender is the Sender of a UDP socket.
type udpSender struct{ *mmsgs }

// NewSender makes a Sender that hands up to batch datagrams to the kernel per
// system call (larger batches take several calls).
func (u *UDP) NewSender(batch int) Sender {
	s := udpSender{newMmsgs(u, batch)}
	s.fn = func(fd uintptr) bool { return s.call(unix.SYS_SENDMMSG, fd) }
	return s
}

func (s udpSender) Send(bufs [][]byte, to Endpoint) (sent int, err error) {
	namelen, err := s.putSockaddr(to.Remote)
	if err != nil {
		return 0, err
	}
	oob := s.putPktinfo(to)
	for len(bufs) > 0 {
		count := min(len(bufs), len(s.hdrs))
		for i := range count {
			if len(bufs[i]) == 0 {
				s.iovs[i].Base = nil
			} else {
				s.iovs[i].Base = &bufs[i][0]
			}
			s.iovs[i].SetLen(len(bufs[i]))
			h := &s.hdrs[i].Hdr
			h.Name = (*byte)(unsafe.Pointer(&s.names[0]))
			h.Namelen = namelen
			if oob > 0 {
				h.Control = &s.oob[0]
			} else {
				h.Control = nil
			}
			h.SetControllen(oob)
		}
		s.count = count
		if werr := s.u.rc.Write(s.fn); werr != nil {
			return sent, werr // the socket is closed
		}
		if s.errno != 0 && s.n <= 0 {
			// The first message failed (too big, no route...): skip it so
			// that one bad datagram does not block the rest.
			if err == nil {
				err = fmt.Errorf("conn: sendmmsg to %v: %w", to.Remote, s.errno)
			}
			bufs = bufs[1:]
			continue
		}
		sent += s.n
		bufs = bufs[s.n:]
	}
	return sent, err
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
func (s udpSender) putPktinfo(to Endpoint) int {
	local := to.Local.Unmap()
	if !local.IsValid() || local.IsUnspecified() {
		return 0
	}
	h := (*unix.Cmsghdr)(unsafe.Pointer(&s.oob[0]))
	data := s.oob[unix.CmsgLen(0):]
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

// parsePktinfo finds the destination address in the control messages the
// kernel wrote for one datagram; the zero Addr if there is none. It walks
// the bytes itself, so that it does not allocate.
func parsePktinfo(oob []byte) netip.Addr {
	for len(oob) >= unix.CmsgLen(0) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		n := int(h.Len)
		if n < unix.CmsgLen(0) || n > len(oob) {
			return netip.Addr{}
		}
		data := oob[unix.CmsgLen(0):n]
		switch {
		case h.Level == unix.IPPROTO_IPV6 && h.Type == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			pi := (*unix.Inet6Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom16(pi.Addr).Unmap()
		case h.Level == unix.IPPROTO_IP && h.Type == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			pi := (*unix.Inet4Pktinfo)(unsafe.Pointer(&data[0]))
			return netip.AddrFrom4(pi.Addr)
		}
		next := unix.CmsgSpace(n - unix.CmsgLen(0))
		if next > len(oob) {
			return netip.Addr{}
		}
		oob = oob[next:]
	}
	return netip.Addr{}
}
