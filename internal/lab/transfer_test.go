package lab_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/overlayd/overlayd/internal/lab"
)

// TestLargeTransfers: 8 MiB TCP transfers, content checked, both ways
// between neighbours and through a relay (h1 and h3 cannot reach each
// other on the underlay, so h2 relays), with the socket's UDP GSO and GRO
// on and, as on a kernel without them, off (OVERLAYD_UDP_OFFLOAD=off); and
// encrypted, where WireGuard carries the data on overlayd's batched socket
// and h2's kernel relays between its WireGuard peers.
func TestLargeTransfers(t *testing.T) {
	for _, c := range []struct {
		name      string
		gso       bool
		encrypted bool
	}{{"gso=true", true, false}, {"gso=false", false, false}, {"encrypted", true, true}} {
		gso := c.gso
		t.Run(c.name, func(t *testing.T) {
			l := lab.New(t, bin, 3)
			h1, h2, h3 := l.Host(1), l.Host(2), l.Host(3)
			cutApart(t, h1, h3)
			if !gso {
				for _, h := range []*lab.Host{h1, h2, h3} {
					h.Env = []string{"OVERLAYD_UDP_OFFLOAD=off"}
				}
			}
			start := func(h *lab.Host, args ...string) *lab.Daemon {
				args = append([]string{"--range", testRange}, args...)
				if !c.encrypted {
					return h.Start(args...)
				}
				// Each encrypted host needs an interface name of its own
				// (WireGuard's sockets are the machine's), and a clean
				// stop, which removes its socket.
				d := h.Start(append(args, "--password", "correct horse", "--iface", fmt.Sprintf("ovlt%d", h.Index))...)
				t.Cleanup(func() { d.Stop(5 * time.Second) })
				return d
			}
			d1 := start(h1)
			d2 := start(h2, "--peer", h1.Addr.String())
			d3 := start(h3, "--peer", h2.Addr.String())
			waitConnected(t, d2, 2, 10*time.Second)
			for i, d := range []*lab.Daemon{d1, d2, d3} {
				expose(t, d, i+1)
			}
			waitPing(t, h1, overlayAddr(3), 10*time.Second)
			for i, c := range []struct {
				from, to *lab.Host
				dst      int
			}{{h1, h2, 2}, {h2, h1, 1}, {h1, h3, 3}, {h3, h1, 1}} {
				took, err := lab.TransferTCP(c.from, c.to, overlayAddr(c.dst), uint16(5200+i), 8<<20, 60*time.Second)
				if err != nil {
					t.Fatalf("TCP %s -> %s: %v", c.from.NS, c.to.NS, err)
				}
				t.Logf("8 MiB %s -> %s in %v", c.from.NS, c.to.NS, took.Round(time.Millisecond))
			}
			if s := mustStatus(t, d2).Router.Stats; !c.encrypted && s.RelayedBytes < 16<<20 {
				t.Errorf("h2 relayed %d bytes, want the two 8 MiB transfers", s.RelayedBytes)
			}
			if c.encrypted {
				// The data went through WireGuard: h2's took in three
				// transfers (h1's to h2, and the two it relays) and sent
				// three (its own to h1, and the two it relays).
				if wg := mustStatus(t, d2).Router.WireGuard; wg == nil || wg.RxBytes < 24<<20 || wg.TxBytes < 24<<20 {
					t.Errorf("h2's WireGuard: %+v, want three 8 MiB transfers received and three sent", wg)
				}
			}
			// Still in use after the transfers (a refused GSO send turns
			// it off).
			for _, d := range []*lab.Daemon{d1, d2, d3} {
				if st := mustStatus(t, d); st.Router.UDPGSO != gso || st.Router.UDPGRO != gso {
					t.Errorf("%s: udpGSO %v, udpGRO %v, want both %v", d.Host.NS, st.Router.UDPGSO, st.Router.UDPGRO, gso)
				}
			}
		})
	}
}
