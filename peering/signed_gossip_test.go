package peering

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/peering/secure"
	"github.com/overlayd/overlayd/proto"
)

// passwordMode sets a node up for password mode, with keys drawn from
// seed and a password shared by every node given the same psk.
func passwordMode(t *testing.T, seed uint64, psk secure.PSK) func(*Config) {
	t.Helper()
	r := rand.NewChaCha8([32]byte{byte(seed), 0x51})
	id, err := secure.NewIdentity(r)
	if err != nil {
		t.Fatal(err)
	}
	sk, err := secure.NewSigningKey(r)
	if err != nil {
		t.Fatal(err)
	}
	return func(c *Config) {
		c.Secure = &secure.Config{Identity: id, PSK: psk, Random: r}
		c.Signing = &sk
	}
}

// TestSignedGossipRelayed: in password mode, in a line a - b - c, a's
// gossip to c is signed by a, relayed by b and handed to c's channel
// without its signature; a message whose signature does not check is not
// handed over, and is counted.
func TestSignedGossipRelayed(t *testing.T) {
	ctx := context.Background()
	var psk secure.PSK
	copy(psk[:], "a password")
	got := make(chan []byte, 8)
	noDiscovery := func(c *Config) { c.Discovery = false }
	channel := func(c *Config) {
		c.Channels = map[string]func(proto.PeerName, []byte){"test": func(src proto.PeerName, p []byte) {
			if src == 0xa {
				got <- p
			}
		}}
	}
	a := startNode(t, 0xa, "a", noDiscovery, channel, passwordMode(t, 1, psk))
	b := startNode(t, 0xb, "b", noDiscovery, passwordMode(t, 2, psk))
	c := startNode(t, 0xc, "c", noDiscovery, channel, passwordMode(t, 3, psk))
	a.r.Connect(ctx, []string{loopback(b)})
	c.r.Connect(ctx, []string{loopback(b)})
	eventually(t, "a and c know each other's keys", func() bool {
		_, ka := c.r.SigningKey(0xa)
		_, kc := a.r.SigningKey(0xc)
		return ka && kc
	})
	payload := bytes.Repeat([]byte("signed "), 500) // chunked
	out := a.r.Outbox("test")
	eventually(t, "a's message reaches c through b", func() bool {
		out.Send(0xc, payload)
		select {
		case p := <-got:
			if !bytes.Equal(p, payload) {
				t.Fatalf("c got %d bytes, not the payload", len(p))
			}
			return true
		case <-time.After(200 * time.Millisecond):
			return false
		}
	})
	if n := c.r.Stats().GossipUnsigned.Load(); n != 0 {
		t.Errorf("c refused %d of a's messages", n)
	}
}

// TestGossipVerified: a message is handed over only with the signature of
// its origin over its channel, origin, destination and payload.
func TestGossipVerified(t *testing.T) {
	sk, err := secure.NewSigningKey(rand.NewChaCha8([32]byte{7}))
	if err != nil {
		t.Fatal(err)
	}
	other, err := secure.NewSigningKey(rand.NewChaCha8([32]byte{8}))
	if err != nil {
		t.Fatal(err)
	}
	r := newTestRouter(t)
	r.snap.Store(&snapshot{keys: map[proto.PeerName][proto.TopoKeyLen]byte{0xa: sk.Public}})
	c := &control{r: r, log: zap.NewNop()}
	msg := []byte("a ring")
	signed := func(k secure.SigningKey, channel string, src, dst proto.PeerName) []byte {
		sig := k.Sign(proto.GossipSigned(channel, src, dst, msg))
		return append(bytes.Clone(msg), sig[:]...)
	}
	good := proto.Gossip{Channel: proto.ChannelIPAM, Src: 0xa, Dst: 1}
	if p := c.verified(&good, signed(sk, proto.ChannelIPAM, 0xa, 1)); !bytes.Equal(p, msg) {
		t.Fatalf("a good signature: got %q", p)
	}
	for _, tc := range []struct {
		name    string
		g       proto.Gossip
		payload []byte
	}{
		{"another key", good, signed(other, proto.ChannelIPAM, 0xa, 1)},
		{"for another peer", good, signed(sk, proto.ChannelIPAM, 0xa, 2)},
		{"on another channel", good, signed(sk, proto.ChannelNames, 0xa, 1)},
		{"of an unknown origin", proto.Gossip{Channel: proto.ChannelIPAM, Src: 0xb, Dst: 1}, signed(sk, proto.ChannelIPAM, 0xb, 1)},
		{"unsigned", good, msg},
		{"tampered", good, append([]byte("A"), signed(sk, proto.ChannelIPAM, 0xa, 1)[1:]...)},
	} {
		before := r.Stats().GossipUnsigned.Load()
		if p := c.verified(&tc.g, tc.payload); p != nil {
			t.Errorf("%s: handed over %q", tc.name, p)
		}
		if r.Stats().GossipUnsigned.Load() != before+1 {
			t.Errorf("%s: not counted", tc.name)
		}
	}
}
