package api

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
	"go.uber.org/zap"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type fakeBackend struct {
	connected []string
	exposed   []netip.Prefix
}

func (f *fakeBackend) Status(context.Context) (Status, error) {
	return Status{Version: "test"}, nil
}
func (f *fakeBackend) Connect(_ context.Context, peers []string) error {
	f.connected = append(f.connected, peers...)
	return nil
}
func (f *fakeBackend) Forget(context.Context, []string) error {
	return BadRequest("not a target")
}
func (f *fakeBackend) Expose(_ context.Context, p netip.Prefix) (netip.Prefix, error) {
	if !p.IsValid() {
		p = netip.MustParsePrefix("10.0.0.9/24") // "from IPAM"
	}
	f.exposed = append(f.exposed, p)
	return p, nil
}
func (f *fakeBackend) Alloc(_ context.Context, id string, subnet netip.Prefix) (netip.Prefix, error) {
	if !subnet.IsValid() {
		return netip.MustParsePrefix("10.0.0.1/24"), nil
	}
	return netip.PrefixFrom(subnet.Addr().Next(), subnet.Bits()), nil
}
func (f *fakeBackend) Claim(_ context.Context, id string, p netip.Prefix) (netip.Prefix, error) {
	return p, nil
}
func (f *fakeBackend) Release(_ context.Context, id string, a netip.Addr) error {
	return BadRequest("Delete: no addresses for %s", id)
}
func (f *fakeBackend) RmPeer(context.Context, string) (RmPeerResponse, error) {
	return RmPeerResponse{}, ErrIPAMOff
}
func (f *fakeBackend) Ring(context.Context) (IPAMStatus, error) {
	return IPAMStatus{Status: "ready"}, nil
}
func (f *fakeBackend) Hide(context.Context, netip.Prefix) error {
	return errors.New("netlink exploded")
}
func (f *fakeBackend) DNS(context.Context) (DNSStatus, error) {
	return DNSStatus{Enabled: true, Domain: "weave.local."}, nil
}
func (f *fakeBackend) DNSAdd(_ context.Context, req DNSRequest) (DNSResponse, error) {
	return DNSResponse{Entries: []DNSEntry{{Hostname: req.Name, Address: req.Addresses[0]}}}, nil
}
func (f *fakeBackend) DNSRemove(context.Context, DNSRequest) (DNSResponse, error) {
	return DNSResponse{}, ErrDNSOff
}
func (f *fakeBackend) Attach(_ context.Context, req AttachRequest) (Attachment, error) {
	return Attachment{ID: req.Target}, nil
}
func (f *fakeBackend) Detach(context.Context, AttachRequest) error { return nil }
func (f *fakeBackend) Ps(context.Context) (PsResponse, error)      { return PsResponse{}, nil }
func (f *fakeBackend) DNSLookup(_ context.Context, name string) (LookupResponse, error) {
	return LookupResponse{Name: name}, nil
}

// isStatus reports whether err is the daemon's refusal with HTTP status
// code.
func isStatus(err error, code int) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Code == code
}

func startServer(t *testing.T, path string, b Backend) {
	t.Helper()
	s, err := Listen(path, b, "test", zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		if _, err := os.Stat(path); err == nil {
			t.Error("socket left behind")
		}
	})
}

func TestServerAndClient(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "api.sock")
	b := &fakeBackend{}
	startServer(t, path, b)
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode: %v %v", fi, err)
	}
	c := NewClient(path)
	ctx := context.Background()
	if st, err := c.Status(ctx); err != nil || st.Version != "test" {
		t.Errorf("status: %+v, %v", st, err)
	}
	if v, err := c.Version(ctx); err != nil || v.Version != "test" || v.ProtocolMinVersion != 1 {
		t.Errorf("version: %+v, %v", v, err)
	}
	if err := c.Connect(ctx, []string{"a", "b:1"}); err != nil || strings.Join(b.connected, ",") != "a,b:1" {
		t.Errorf("connect: %v, %v", b.connected, err)
	}
	if err := c.Forget(ctx, []string{"x"}); err == nil || err.Error() != "not a target" {
		t.Errorf("forget: %v", err)
	}
	pfx := netip.MustParsePrefix
	if _, err := c.Expose(ctx, pfx("10.0.0.1/24")); err != nil || len(b.exposed) != 1 {
		t.Errorf("expose: %v %v", b.exposed, err)
	}
	if p, err := c.Expose(ctx, netip.Prefix{}); err != nil || p.String() != "10.0.0.9/24" {
		t.Errorf("expose from IPAM: %v %v", p, err)
	}
	if _, err := c.Expose(ctx, pfx("fd00::1/64")); !isStatus(err, 400) {
		t.Errorf("expose of IPv6: %v", err)
	}
	if p, err := c.Alloc(ctx, "c1", pfx("10.0.1.0/24")); err != nil || p.String() != "10.0.1.1/24" {
		t.Errorf("alloc in subnet: %v %v", p, err)
	}
	for _, bad := range []struct {
		id  string
		sub netip.Prefix
	}{{"", netip.Prefix{}}, {"has space", netip.Prefix{}}, {"c1", pfx("10.0.1.1/24")}} {
		if _, err := c.Alloc(ctx, bad.id, bad.sub); !isStatus(err, 400) {
			t.Errorf("alloc %q in %v: %v", bad.id, bad.sub, err)
		}
	}
	if p, err := c.Claim(ctx, "c1", pfx("1.1.1.1/24")); err != nil || p.String() != "1.1.1.1/24" {
		t.Errorf("claim: %v %v", p, err)
	}
	if err := c.Release(ctx, "c9", netip.Addr{}); !isStatus(err, 400) || err.Error() != "Delete: no addresses for c9" {
		t.Errorf("release: %v", err)
	}
	if err := c.Release(ctx, "c9", netip.MustParseAddr("fd00::1")); !isStatus(err, 400) || !strings.Contains(err.Error(), "not an IPv4 address") {
		t.Errorf("release of an IPv6 address: %v", err)
	}
	if _, err := c.RmPeer(ctx, "x"); !isStatus(err, 400) || !strings.Contains(err.Error(), "IPAM is off") {
		t.Errorf("rmpeer: %v", err)
	}
	if _, err := c.RmPeer(ctx, ""); !isStatus(err, 400) || !strings.Contains(err.Error(), "a peer name is required") {
		t.Errorf("rmpeer of no peer: %v", err)
	}
	if st, err := c.Ring(ctx); err != nil || st.Status != "ready" {
		t.Errorf("ring: %v %v", st, err)
	}
	if err := c.Hide(ctx, pfx("10.0.0.1/24")); !isStatus(err, 500) || err.Error() != "netlink exploded" {
		t.Errorf("hide: %v", err)
	}
	// Malformed requests and unknown endpoints get clear answers.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return net.Dial("unix", path)
	}}}
	for _, tc := range []struct {
		method, path, body string
		code               int
	}{
		{"POST", "/v1/connect", "{not json", 400},
		{"POST", "/v1/connect", `{"peers": ["a"], "extra": 1}`, 400},
		{"POST", "/v1/expose", `{"cidr": 5}`, 400},
		{"POST", "/v1/expose", `{"cidr": "10.0.0.1"}`, 400},
		{"POST", "/v1/expose", `{"cidr": "nonsense"}`, 400},
		{"POST", "/v1/hide", `{}`, 400},
		{"POST", "/v1/ipam/alloc", `{"id": "c1", "subnet": "x"}`, 400},
		{"POST", "/v1/ipam/release", `{"id": "c1", "address": "nonsense"}`, 400},
		{"POST", "/v1/dns/add", `{"name": "a", "addresses": ["1.2.3.4/24"]}`, 400},
		{"POST", "/v1/attach", `{"target": "x", "cidrs": ["fd00::1/64"]}`, 400},
		{"GET", "/v1/nothing", "", 404},
		{"DELETE", "/v1/status", "", 405},
	} {
		req, _ := http.NewRequest(tc.method, "http://x"+tc.path, strings.NewReader(tc.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Errorf("%s %s %q: %d, want %d", tc.method, tc.path, tc.body, resp.StatusCode, tc.code)
		}
	}
	hc.CloseIdleConnections()
	// A second server on a live socket is refused.
	if _, err := Listen(path, b, "test", zap.NewNop()); err == nil || !strings.Contains(err.Error(), "another overlayd") {
		t.Errorf("second listener: %v", err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close() // leaves the file, like a killed daemon
	startServer(t, path, &fakeBackend{})
	if _, err := NewClient(path).Status(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestFileNotReplaced: a --socket that names a file (a mistake) is
// refused, and the file is neither removed nor changed.
func TestFileNotReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(path, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path, &fakeBackend{}, "test", zap.NewNop()); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen on a file: %v", err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "data" {
		t.Errorf("the file: %q, %v", b, err)
	}
}

func TestClientErrors(t *testing.T) {
	err := NewClient(filepath.Join(t.TempDir(), "none.sock")).Connect(context.Background(), []string{"a"})
	if err == nil || !strings.Contains(err.Error(), "no socket at") {
		t.Errorf("missing socket: %v", err)
	}
}

// TestProfiles: the socket serves Go's heap profile (gzipped protobuf) and
// the index of profiles.
func TestProfiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "api.sock")
	startServer(t, path, &fakeBackend{})
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	defer c.CloseIdleConnections()
	for url, want := range map[string]string{
		"http://overlayd/debug/pprof/heap": "\x1f\x8b", // gzip
		"http://overlayd/debug/pprof/":     "goroutine",
	} {
		resp, err := c.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %s, %d bytes, %v", url, resp.Status, len(body), err)
		}
	}
}
