package resolver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"
)

// MaxTCPConns bounds the TCP connections served at once.
const MaxTCPConns = 128

// Server serves a handler on UDP and TCP at one address.
type Server struct {
	udp, tcp *dns.Server
}

// Listen opens the UDP and TCP sockets now, so that a busy port is an
// error at start, not later.
func Listen(addr string, h dns.Handler) (*Server, error) {
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("resolver: %w", err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("resolver: %w", err)
	}
	// Beyond this many connections, new ones wait in the kernel's
	// backlog: a client that opens connections and sends nothing (each
	// is held for ReadTimeout) cannot exhaust the process.
	l = netutil.LimitListener(l, MaxTCPConns)
	return &Server{
		udp: &dns.Server{PacketConn: pc, Handler: h, UDPSize: dns.DefaultMsgSize},
		tcp: &dns.Server{Listener: l, Handler: h, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second},
	}, nil
}

// Addr is the UDP address served (the TCP one has the same host and port
// unless the port was 0).
func (s *Server) Addr() net.Addr { return s.udp.PacketConn.LocalAddr() }

// TCPAddr is the TCP address served.
func (s *Server) TCPAddr() net.Addr { return s.tcp.Listener.Addr() }

// Close closes the sockets of a server that was never run.
func (s *Server) Close() {
	s.udp.PacketConn.Close()
	s.tcp.Listener.Close()
}

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	servers := []*dns.Server{s.udp, s.tcp}
	started := make(chan struct{}, len(servers))
	for _, srv := range servers {
		srv.NotifyStartedFunc = func() { started <- struct{}{} }
		g.Go(func() error {
			err := srv.ActivateAndServe()
			if gctx.Err() != nil {
				return nil
			}
			if err == nil {
				err = errors.New("stopped")
			}
			return fmt.Errorf("resolver: serving DNS: %w", err)
		})
	}
	g.Go(func() error {
		<-gctx.Done()
		// Shutdown refuses a server that has not started yet.
		for range servers {
			select {
			case <-started:
			case <-time.After(time.Second):
			}
		}
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.udp.ShutdownContext(sctx)
		s.tcp.ShutdownContext(sctx)
		// A server that never started is not shut down: close its socket.
		s.Close()
		return nil
	})
	return g.Wait()
}
