package lab

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// TransferTCP sends size random bytes over one TCP connection from host
// `from` to addr:port, where host `to` listens, and checks that exactly the
// same bytes arrive (length and SHA-256). It returns the elapsed time.
func TransferTCP(from, to *Host, addr netip.Addr, port uint16, size int, timeout time.Duration) (time.Duration, error) {
	payload := make([]byte, size)
	rand.Read(payload)
	return SendTCP(from, to, addr, port, payload, timeout)
}

// SendTCP is TransferTCP with the given payload.
func SendTCP(from, to *Host, addr netip.Addr, port uint16, payload []byte, timeout time.Duration) (time.Duration, error) {
	size := len(payload)
	var ln net.Listener
	if err := to.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", netip.AddrPortFrom(addr, port).String())
		return err
	}); err != nil {
		return 0, fmt.Errorf("listening on %v in %s: %w", addr, to.NS, err)
	}
	defer ln.Close()

	want := sha256.Sum256(payload)

	type result struct {
		n   int64
		sum [32]byte
		err error
	}
	got := make(chan result, 1)
	deadline := time.Now().Add(timeout)
	go func() {
		ln.(*net.TCPListener).SetDeadline(deadline)
		c, err := ln.Accept()
		if err != nil {
			got <- result{err: fmt.Errorf("accept: %w", err)}
			return
		}
		defer c.Close()
		c.SetDeadline(deadline)
		h := sha256.New()
		n, err := io.Copy(h, c)
		var r result
		r.n, r.err = n, err
		copy(r.sum[:], h.Sum(nil))
		got <- r
	}()

	start := time.Now()
	var c net.Conn
	if err := from.Do(func() error {
		var err error
		d := net.Dialer{Deadline: deadline}
		c, err = d.Dial("tcp4", netip.AddrPortFrom(addr, port).String())
		return err
	}); err != nil {
		return 0, fmt.Errorf("connecting from %s to %v: %w", from.NS, addr, err)
	}
	c.SetDeadline(deadline)
	_, werr := io.Copy(c, bytes.NewReader(payload))
	c.(*net.TCPConn).CloseWrite()
	r := <-got
	c.Close()
	elapsed := time.Since(start)
	switch {
	case werr != nil:
		return elapsed, fmt.Errorf("sending: %w", werr)
	case r.err != nil:
		return elapsed, fmt.Errorf("receiving: %w (after %d bytes)", r.err, r.n)
	case r.n != int64(size):
		return elapsed, fmt.Errorf("received %d bytes, sent %d", r.n, size)
	case r.sum != want:
		return elapsed, fmt.Errorf("content differs: sha256 %x, sent %x", r.sum, want)
	}
	return elapsed, nil
}

// SendUDP sends each payload as one datagram from the host to dst.
func (h *Host) SendUDP(dst netip.AddrPort, payloads [][]byte) error {
	return h.Do(func() error {
		c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer c.Close()
		for i, p := range payloads {
			if _, err := c.Write(p); err != nil {
				// ICMP port unreachable from an earlier datagram shows up
				// here; the junk was still sent.
				if i%256 == 0 {
					time.Sleep(time.Millisecond)
				}
			}
		}
		return nil
	})
}

// Get fetches http://addr/path from inside the host (a metrics endpoint,
// say) and returns the body of a 200 answer. The socket is made on the
// host's namespace thread, so no http.Client (it dials from goroutines of
// its own).
func (h *Host) Get(addr, path string) (string, error) {
	var c net.Conn
	if err := h.Do(func() (err error) {
		c, err = net.Dial("tcp", addr)
		return err
	}); err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: overlayd\r\n\r\n", path)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return string(b), nil
}
