package fuzz

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/api"
)

// apiBackend accepts everything and checks, as it goes, that the server
// only hands it what the server's checks promise.
type apiBackend struct {
	mu    sync.Mutex
	calls int
	bad   []string // what the server should have refused
}

var _ api.Backend = (*apiBackend)(nil)

func (b *apiBackend) called(problems ...string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls++
	for _, p := range problems {
		if p != "" {
			b.bad = append(b.bad, p)
		}
	}
}

// take returns the calls and problems since the last take.
func (b *apiBackend) take() (int, []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, bad := b.calls, b.bad
	b.calls, b.bad = 0, nil
	return n, bad
}

// apiID says what is wrong with an ID the server let through ("": nothing).
func apiID(id string) string {
	if id == "" || len(id) > api.MaxIDLen {
		return fmt.Sprintf("ID of %d bytes", len(id))
	}
	for _, r := range id {
		if r < 0x21 || r == 0x7f || r == utf8.RuneError {
			return fmt.Sprintf("ID %q", id)
		}
	}
	return ""
}

// apiCIDR says what is wrong with a CIDR the server let through.
func apiCIDR(p netip.Prefix) string {
	if !p.IsValid() || !p.Addr().Is4() {
		return fmt.Sprintf("CIDR %v", p)
	}
	return ""
}

func apiAddrs(as []netip.Addr) string {
	if len(as) > 1024 {
		return fmt.Sprintf("%d addresses", len(as))
	}
	for _, a := range as {
		if !a.Is4() {
			return fmt.Sprintf("address %v", a)
		}
	}
	return ""
}

func apiContainer(id string) string {
	if id == "" {
		return ""
	}
	return apiID(id)
}

func apiAttach(req api.AttachRequest) string {
	if req.Target == "" || len(req.Target) > 4096 || strings.ContainsRune(req.Target, 0) {
		return fmt.Sprintf("target %q", req.Target)
	}
	if len(req.CIDRs) > 64 {
		return fmt.Sprintf("%d CIDRs", len(req.CIDRs))
	}
	for _, c := range req.CIDRs {
		if p := apiCIDR(c); p != "" {
			return p
		}
	}
	return ""
}

func (b *apiBackend) Status(context.Context) (api.Status, error) { return api.Status{}, nil }
func (b *apiBackend) Connect(context.Context, []string) error    { b.called(); return nil }
func (b *apiBackend) Forget(context.Context, []string) error     { b.called(); return nil }
func (b *apiBackend) Expose(_ context.Context, p netip.Prefix) (netip.Prefix, error) {
	if p.IsValid() {
		b.called(apiCIDR(p))
		return p, nil
	}
	b.called()
	return netip.MustParsePrefix("10.32.0.9/12"), nil
}
func (b *apiBackend) Hide(_ context.Context, p netip.Prefix) error { b.called(apiCIDR(p)); return nil }
func (b *apiBackend) Alloc(_ context.Context, id string, subnet netip.Prefix) (netip.Prefix, error) {
	bad := ""
	if subnet.IsValid() && (!subnet.Addr().Is4() || subnet.Masked() != subnet) {
		bad = fmt.Sprintf("subnet %v", subnet)
	}
	b.called(apiID(id), bad)
	return netip.MustParsePrefix("10.32.0.1/12"), nil
}
func (b *apiBackend) Claim(_ context.Context, id string, p netip.Prefix) (netip.Prefix, error) {
	b.called(apiID(id), apiCIDR(p))
	return p, nil
}
func (b *apiBackend) Release(_ context.Context, id string, a netip.Addr) error {
	bad := ""
	if a.IsValid() && !a.Is4() {
		bad = fmt.Sprintf("address %v", a)
	}
	b.called(apiID(id), bad)
	return nil
}
func (b *apiBackend) RmPeer(_ context.Context, peer string) (api.RmPeerResponse, error) {
	if peer == "" {
		b.called("no peer")
	} else {
		b.called()
	}
	return api.RmPeerResponse{Taken: 1}, nil
}
func (b *apiBackend) Ring(context.Context) (api.IPAMStatus, error) { return api.IPAMStatus{}, nil }
func (b *apiBackend) DNS(context.Context) (api.DNSStatus, error)   { return api.DNSStatus{}, nil }
func (b *apiBackend) DNSAdd(_ context.Context, req api.DNSRequest) (api.DNSResponse, error) {
	bad := ""
	if req.Name == "" || len(req.Addresses) == 0 {
		bad = "a name and an address are required"
	}
	b.called(bad, apiAddrs(req.Addresses), apiContainer(req.ContainerID))
	return api.DNSResponse{Entries: []api.DNSEntry{}}, nil
}
func (b *apiBackend) DNSRemove(_ context.Context, req api.DNSRequest) (api.DNSResponse, error) {
	bad := ""
	if req.Name == "" && len(req.Addresses) == 0 && req.ContainerID == "" {
		bad = "nothing to remove"
	}
	b.called(bad, apiAddrs(req.Addresses), apiContainer(req.ContainerID))
	return api.DNSResponse{Entries: []api.DNSEntry{}}, nil
}
func (b *apiBackend) DNSLookup(_ context.Context, name string) (api.LookupResponse, error) {
	if name == "" {
		b.called("no name")
	} else {
		b.called()
	}
	return api.LookupResponse{Name: name}, nil
}
func (b *apiBackend) Attach(_ context.Context, req api.AttachRequest) (api.Attachment, error) {
	b.called(apiAttach(req))
	return api.Attachment{ID: "c1"}, nil
}
func (b *apiBackend) Detach(_ context.Context, req api.AttachRequest) error {
	b.called(apiAttach(req))
	return nil
}
func (b *apiBackend) Ps(context.Context) (api.PsResponse, error) { return api.PsResponse{}, nil }

// apiPaths are the POST endpoints of the control API.
var apiPaths = []string{"/v1/connect", "/v1/forget", "/v1/expose", "/v1/hide", "/v1/ipam/alloc", "/v1/ipam/claim",
	"/v1/ipam/release", "/v1/ipam/rmpeer", "/v1/dns/add", "/v1/dns/remove", "/v1/dns/lookup", "/v1/attach", "/v1/detach"}

func apiPath(p string) uint8 {
	for i, q := range apiPaths {
		if q == p {
			return uint8(i)
		}
	}
	panic(p)
}

// apiSeeds are bodies overlayctl and the Docker plugin send, and some
// they do not, with the status each gets.
func apiSeeds() []struct {
	call   uint8
	body   string
	status int
} {
	type seed = struct {
		call   uint8
		body   string
		status int
	}
	return []seed{
		{apiPath("/v1/connect"), `{"peers":["10.0.0.1","host.example:7000","[fd00::1]:6783"]}`, 204},
		{apiPath("/v1/forget"), `{"peers":["10.0.0.1:6783"]}`, 204},
		{apiPath("/v1/expose"), `{}`, 200},
		{apiPath("/v1/expose"), `{"cidr":"10.32.0.9/12"}`, 200},
		{apiPath("/v1/hide"), `{"cidr":"10.32.0.9/12"}`, 204},
		{apiPath("/v1/ipam/alloc"), `{"id":"4bd4b3a3a6c8e0f1","subnet":"10.32.1.0/24"}`, 200},
		{apiPath("/v1/ipam/alloc"), `{"id":"weave:expose"}`, 200},
		{apiPath("/v1/ipam/claim"), `{"id":"c1","cidr":"10.32.0.5/12"}`, 200},
		{apiPath("/v1/ipam/release"), `{"id":"c1","address":"10.32.0.5"}`, 204},
		{apiPath("/v1/ipam/release"), `{"id":"c1"}`, 204},
		{apiPath("/v1/ipam/rmpeer"), `{"peer":"12:d2:fe:7a:c1:f2"}`, 200},
		{apiPath("/v1/dns/add"), `{"name":"web","addresses":["10.32.0.1","10.32.0.2"],"containerID":"c1"}`, 200},
		{apiPath("/v1/dns/remove"), `{"containerID":"c1"}`, 200},
		{apiPath("/v1/dns/lookup"), `{"name":"web.weave.local."}`, 200},
		{apiPath("/v1/attach"), `{"target":"/var/run/netns/c1","cidrs":["10.32.0.3/12"],"name":"web"}`, 200},
		{apiPath("/v1/detach"), `{"target":"c1"}`, 204},
		// Refused.
		{apiPath("/v1/connect"), `{"peers":"10.0.0.1"}`, 400},
		{apiPath("/v1/expose"), `{"cidr":"fd00::1/64"}`, 400},
		{apiPath("/v1/hide"), `{}`, 400},
		{apiPath("/v1/ipam/alloc"), `{"id":"a b"}`, 400},
		{apiPath("/v1/ipam/alloc"), `{"id":"c1","subnet":"10.32.1.1/24"}`, 400},
		{apiPath("/v1/ipam/claim"), `{"id":"c1","cidr":"10.32.0.5"}`, 400},
		{apiPath("/v1/ipam/release"), `{"id":"c1","address":"fd00::1"}`, 400},
		{apiPath("/v1/ipam/rmpeer"), `{"peer":""}`, 400},
		{apiPath("/v1/dns/add"), `{"name":"web"}`, 400},
		{apiPath("/v1/dns/remove"), `{}`, 400},
		{apiPath("/v1/dns/lookup"), `{"name":"web","x":1}`, 400},
		{apiPath("/v1/attach"), `{"target":"c1","cidrs":["10.32.0.3"]}`, 400},
		{apiPath("/v1/detach"), `{"target":""}`, 400},
		{apiPath("/v1/connect"), ``, 400},
		{apiPath("/v1/connect"), `{"peers":[`, 400},
	}
}

// apiServe serves the API for b on a socket in a temporary directory
// until the test ends, and returns a client for it.
func apiServe(tb testing.TB, b api.Backend) *http.Client {
	path := filepath.Join(tb.TempDir(), "api.sock")
	s, err := api.Listen(path, b, "fuzz", zap.NewNop())
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
	tb.Cleanup(func() {
		c.CloseIdleConnections()
		cancel()
		if err := <-done; err != nil {
			tb.Error(err)
		}
	})
	return c
}

// apiPost sends body to path and returns the status, content type and
// answer.
func apiPost(tb testing.TB, c *http.Client, path string, body []byte) (int, string, []byte) {
	resp, err := c.Post("http://overlayd"+path, "application/json", bytes.NewReader(body))
	if err != nil {
		tb.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatalf("POST %s: reading the answer: %v", path, err)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), answer
}

// TestAPISeeds: the seeds of FuzzAPIRequest get the answers they were
// written for, so that the corpus starts from accepted requests of every
// call, not only from refusals.
func TestAPISeeds(t *testing.T) {
	b := &apiBackend{}
	c := apiServe(t, b)
	for i, s := range apiSeeds() {
		if code, _, answer := apiPost(t, c, apiPaths[s.call], []byte(s.body)); code != s.status {
			t.Errorf("seed %d, %s %s: status %d (%s), want %d", i, apiPaths[s.call], s.body, code, bytes.TrimSpace(answer), s.status)
		}
	}
}

// FuzzAPIRequest posts a body to a POST endpoint of the control API, over
// its unix socket, with a backend that accepts everything. It never
// panics, and:
//   - the answer is 200 or 204 (the backend called once) or 400 (not
//     called), never a 5xx: with a backend that never fails, every error is
//     the request's;
//   - a body that is not JSON is refused with 400;
//   - 200 and 400 answers are JSON, a 400's with an error message;
//   - the backend gets only what the server's checks let through: IDs of
//     1 to 255 printable bytes, IPv4 CIDRs and addresses, at most 1024
//     addresses and 64 CIDRs, targets without NUL, the fields each call
//     requires.
func FuzzAPIRequest(f *testing.F) {
	for _, s := range apiSeeds() {
		f.Add(s.call, []byte(s.body))
	}
	b := &apiBackend{}
	c := apiServe(f, b)
	f.Fuzz(func(t *testing.T, call uint8, body []byte) {
		path := apiPaths[int(call)%len(apiPaths)]
		b.take()
		code, ct, answer := apiPost(t, c, path, body)
		calls, bad := b.take()
		switch code {
		case http.StatusOK, http.StatusNoContent:
			if calls != 1 {
				t.Fatalf("%s %q: %d after %d backend calls", path, body, code, calls)
			}
			if !json.Valid(body) {
				t.Fatalf("%s: %d for a body that is not JSON: %q", path, code, body)
			}
		case http.StatusBadRequest:
			if calls != 0 {
				t.Fatalf("%s %q: 400 after %d backend calls", path, body, calls)
			}
			var e api.ErrorResponse
			if err := json.Unmarshal(answer, &e); err != nil || e.Error == "" {
				t.Fatalf("%s %q: 400 with answer %q: %v", path, body, answer, err)
			}
		default:
			t.Fatalf("%s %q: status %d: %s", path, body, code, answer)
		}
		if len(bad) > 0 {
			t.Fatalf("%s %q: the backend got %v", path, body, bad)
		}
		if code != http.StatusNoContent {
			if ct != "application/json" || !json.Valid(answer) {
				t.Fatalf("%s %q: %d answer %q of type %q", path, body, code, answer, ct)
			}
		}
	})
}
