package fuzz

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/dockerplugin"
)

// pluginMaxBody is the server's limit on a request body.
const pluginMaxBody = 1 << 20

// pluginCalls are the requests FuzzPluginRequest can send: every call of
// the protocol, then a few the server must refuse.
var pluginCalls = []struct {
	method, path string
	// backend: an acceptable request reaches the backend, exactly once.
	backend bool
	// parses: the server reads the body as JSON; one that is not JSON
	// is refused.
	parses bool
}{
	{"POST", "/Plugin.Activate", false, false},
	{"POST", "/NetworkDriver.GetCapabilities", false, false},
	{"POST", "/NetworkDriver.CreateNetwork", true, true},
	{"POST", "/NetworkDriver.DeleteNetwork", true, true},
	{"POST", "/NetworkDriver.CreateEndpoint", true, true},
	{"POST", "/NetworkDriver.DeleteEndpoint", true, true},
	{"POST", "/NetworkDriver.EndpointOperInfo", true, true},
	{"POST", "/NetworkDriver.Join", true, true},
	{"POST", "/NetworkDriver.Leave", true, true},
	{"POST", "/NetworkDriver.DiscoverNew", false, false},
	{"POST", "/NetworkDriver.DiscoverDelete", false, false},
	{"POST", "/NetworkDriver.ProgramExternalConnectivity", false, false},
	{"POST", "/NetworkDriver.RevokeExternalConnectivity", false, false},
	{"POST", "/NetworkDriver.AllocateNetwork", false, false},
	{"POST", "/NetworkDriver.FreeNetwork", false, false},
	{"POST", "/IpamDriver.GetCapabilities", false, false},
	{"POST", "/IpamDriver.GetDefaultAddressSpaces", true, false},
	{"POST", "/IpamDriver.RequestPool", true, true},
	{"POST", "/IpamDriver.ReleasePool", true, true},
	{"POST", "/IpamDriver.RequestAddress", true, true},
	{"POST", "/IpamDriver.ReleaseAddress", true, true},
	{"POST", "/NetworkDriver.Nope", false, false},
	{"POST", "/", false, false},
	{"GET", "/NetworkDriver.Join", false, false},
	{"PUT", "/IpamDriver.RequestPool", false, false},
}

// pluginCall returns the index in pluginCalls of a POST to path.
func pluginCall(path string) uint8 {
	for i, c := range pluginCalls {
		if c.method == "POST" && c.path == path {
			return uint8(i)
		}
	}
	panic("no call " + path)
}

// pluginBackend answers every call with the same valid answer, and
// counts the calls and the empty IDs it was given.
type pluginBackend struct {
	calls    int
	emptyIDs int
}

func (b *pluginBackend) called(ids ...string) {
	b.calls++
	for _, id := range ids {
		if id == "" {
			b.emptyIDs++
		}
	}
}

func (b *pluginBackend) CreateNetwork(_ context.Context, req dockerplugin.CreateNetworkRequest) error {
	b.called(req.NetworkID)
	return nil
}

func (b *pluginBackend) DeleteNetwork(_ context.Context, networkID string) error {
	b.called(networkID)
	return nil
}

func (b *pluginBackend) CreateEndpoint(_ context.Context, req dockerplugin.CreateEndpointRequest) (dockerplugin.CreateEndpointResponse, error) {
	b.called(req.NetworkID, req.EndpointID)
	return dockerplugin.CreateEndpointResponse{Interface: &dockerplugin.EndpointInterface{MacAddress: "7a:1b:2c:3d:4e:5f"}}, nil
}

func (b *pluginBackend) DeleteEndpoint(_ context.Context, networkID, endpointID string) error {
	b.called(networkID, endpointID)
	return nil
}

func (b *pluginBackend) EndpointInfo(_ context.Context, networkID, endpointID string) (map[string]any, error) {
	b.called(networkID, endpointID)
	return map[string]any{"ifname": "vethwepl1"}, nil
}

func (b *pluginBackend) Join(_ context.Context, req dockerplugin.JoinRequest) (dockerplugin.JoinResponse, error) {
	b.called(req.NetworkID, req.EndpointID, req.SandboxKey)
	return dockerplugin.JoinResponse{
		InterfaceName: dockerplugin.InterfaceName{SrcName: "vethwepg1", DstPrefix: "ethwe"},
		StaticRoutes:  []dockerplugin.StaticRoute{{Destination: "10.32.0.0/12", RouteType: dockerplugin.RouteConnected}},
	}, nil
}

func (b *pluginBackend) Leave(_ context.Context, networkID, endpointID string) error {
	b.called(networkID, endpointID)
	return nil
}

func (b *pluginBackend) AddressSpaces() dockerplugin.AddressSpaces {
	b.called()
	return dockerplugin.AddressSpaces{LocalDefaultAddressSpace: "weavelocal", GlobalDefaultAddressSpace: "weaveglobal"}
}

func (b *pluginBackend) RequestPool(_ context.Context, req dockerplugin.RequestPoolRequest) (dockerplugin.RequestPoolResponse, error) {
	b.called()
	return dockerplugin.RequestPoolResponse{PoolID: "weavelocal-10.32.0.0/12", Pool: "10.32.0.0/12",
		Data: map[string]string{"com.docker.network.gateway": "10.32.0.1/12"}}, nil
}

func (b *pluginBackend) ReleasePool(_ context.Context, poolID string) error {
	b.called(poolID)
	return nil
}

func (b *pluginBackend) RequestAddress(_ context.Context, req dockerplugin.RequestAddressRequest) (dockerplugin.RequestAddressResponse, error) {
	b.called(req.PoolID)
	return dockerplugin.RequestAddressResponse{Address: "10.32.0.7/12"}, nil
}

func (b *pluginBackend) ReleaseAddress(_ context.Context, poolID, address string) error {
	b.called(poolID, address)
	return nil
}

// pluginSeed is a request of FuzzPluginRequest's corpus and the status
// it must get.
type pluginSeed struct {
	call   uint8
	body   string
	status int
}

// pluginSeeds are request bodies as Docker sends them, and a few it
// does not.
func pluginSeeds() []pluginSeed {
	type seed = pluginSeed
	const endpointOptions = `{"com.docker.network.endpoint.exposedports":[],"com.docker.network.portmap":[]}`
	return []seed{
		{pluginCall("/Plugin.Activate"), ``, 200},
		{pluginCall("/NetworkDriver.GetCapabilities"), ``, 200},
		{pluginCall("/NetworkDriver.CreateNetwork"), `{"NetworkID":"n1","Options":{"com.docker.network.generic":{}},` +
			`"IPv4Data":[{"AddressSpace":"weavelocal","Pool":"10.32.0.0/24","Gateway":"10.32.0.0/24"}],"IPv6Data":[]}`, 200},
		{pluginCall("/NetworkDriver.CreateNetwork"), `{"NetworkID":"d2a8c4f1e0b7","Options":{"com.docker.network.enable_ipv6":false,` +
			`"com.docker.network.generic":{"works":"yes"}},"IPv4Data":[{"AddressSpace":"weavelocal","Pool":"10.32.0.0/12",` +
			`"Gateway":"10.32.0.1/12","AuxAddresses":{"host1":"10.32.0.5/12"}}],"IPv6Data":[]}`, 200},
		{pluginCall("/NetworkDriver.DeleteNetwork"), `{"NetworkID":"n1"}`, 200},
		{pluginCall("/NetworkDriver.CreateEndpoint"), `{"NetworkID":"n1","EndpointID":"e1",` +
			`"Interface":{"Address":"10.32.0.2/12","AddressIPv6":"","MacAddress":""},"Options":` + endpointOptions + `}`, 200},
		{pluginCall("/NetworkDriver.DeleteEndpoint"), `{"NetworkID":"n1","EndpointID":"e1"}`, 200},
		{pluginCall("/NetworkDriver.EndpointOperInfo"), `{"NetworkID":"n1","EndpointID":"e1"}`, 200},
		{pluginCall("/NetworkDriver.Join"), `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/var/run/docker/netns/8d3e2b3f1a2c",` +
			`"Options":` + endpointOptions + `}`, 200},
		{pluginCall("/NetworkDriver.Leave"), `{"NetworkID":"n1","EndpointID":"e1"}`, 200},
		{pluginCall("/NetworkDriver.DiscoverNew"), `{"DiscoveryType":1,"DiscoveryData":{"Address":"192.168.1.2","BindAddress":"0.0.0.0","Self":true}}`, 200},
		{pluginCall("/NetworkDriver.ProgramExternalConnectivity"), `{"NetworkID":"n1","EndpointID":"e1","Options":` + endpointOptions + `}`, 200},
		{pluginCall("/NetworkDriver.AllocateNetwork"), `{"NetworkID":"n1","Options":{},"IPv4Data":[],"IPv6Data":[]}`, 400},
		{pluginCall("/IpamDriver.GetCapabilities"), ``, 200},
		{pluginCall("/IpamDriver.GetDefaultAddressSpaces"), ``, 200},
		{pluginCall("/IpamDriver.RequestPool"), `{"AddressSpace":"weavelocal","Pool":"10.32.0.0/16","SubPool":"10.32.1.0/24","Options":{},"V6":false}`, 200},
		{pluginCall("/IpamDriver.RequestPool"), `{"AddressSpace":"weavelocal","Pool":"","SubPool":"","Options":null,"V6":true}`, 200},
		{pluginCall("/IpamDriver.ReleasePool"), `{"PoolID":"weavelocal-10.32.0.0/16"}`, 200},
		{pluginCall("/IpamDriver.RequestAddress"), `{"PoolID":"weavelocal-10.32.0.0/16","Address":"",` +
			`"Options":{"RequestAddressType":"com.docker.network.gateway"}}`, 200},
		{pluginCall("/IpamDriver.RequestAddress"), `{"PoolID":"weavelocal-10.32.0.0/16","Address":"10.32.0.7","Options":{}}`, 200},
		{pluginCall("/IpamDriver.ReleaseAddress"), `{"PoolID":"weavelocal-10.32.0.0/16","Address":"10.32.0.7"}`, 200},
		// Refused.
		{pluginCall("/NetworkDriver.Join"), `{"NetworkID":"n1","EndpointID":"e1"}`, 400},
		{pluginCall("/NetworkDriver.CreateNetwork"), `{"NetworkID":1}`, 400},
		{pluginCall("/IpamDriver.RequestPool"), `{"Options":{"x":["y"]}}`, 400},
		{pluginCall("/IpamDriver.ReleaseAddress"), `{"PoolID":"p1","Address":"10.32.0.7"} x`, 400},
		{pluginCall("/NetworkDriver.Nope"), `{}`, 404},
		{uint8(len(pluginCalls) - 2), `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"s"}`, 405}, // GET
	}
}

// pluginHandler is the handler of a server for b. The server listens on a
// socket in a temporary directory but never serves it.
func pluginHandler(tb testing.TB, b dockerplugin.Backend) http.Handler {
	s, err := dockerplugin.Listen(tb.TempDir(), "fuzz", b, zap.NewNop())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		// Run closes the listening socket; Close alone would leave it
		// open when Run never started.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := s.Run(ctx); err != nil {
			tb.Error(err)
		}
	})
	return s.Handler()
}

// TestPluginSeeds: the seeds of FuzzPluginRequest get the answers they
// were written for, so that the corpus starts from accepted requests of
// every call, not only from refusals.
func TestPluginSeeds(t *testing.T) {
	b := &pluginBackend{}
	h := pluginHandler(t, b)
	for i, s := range pluginSeeds() {
		c := pluginCalls[s.call]
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(c.method, c.path, bytes.NewReader([]byte(s.body))))
		if w.Code != s.status {
			t.Errorf("seed %d, %s %s %s: status %d (%s), want %d", i, c.method, c.path, s.body, w.Code,
				bytes.TrimSpace(w.Body.Bytes()), s.status)
		}
	}
	if b.calls == 0 {
		t.Error("no seed reached the backend")
	}
}

// FuzzPluginRequest sends a body to a Docker plugin call through the
// server's handler, with a backend that accepts everything. It never
// panics; the answer is 200, 400, 404 or 405 (413 for a body over 1 MiB)
// with Docker's media type and a JSON object, one with a non-empty string
// Err unless it is 200; a body that is not JSON is refused where it is
// read; and the backend is called, with every ID it needs, exactly when
// the answer is 200.
func FuzzPluginRequest(f *testing.F) {
	for _, s := range pluginSeeds() {
		f.Add(s.call, []byte(s.body))
	}
	b := &pluginBackend{}
	h := pluginHandler(f, b)
	f.Fuzz(func(t *testing.T, i uint8, body []byte) {
		c := pluginCalls[int(i)%len(pluginCalls)]
		*b = pluginBackend{}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(c.method, c.path, bytes.NewReader(body)))

		switch w.Code {
		case http.StatusOK, http.StatusBadRequest, http.StatusNotFound, http.StatusMethodNotAllowed:
			if len(body) > pluginMaxBody && c.method == "POST" && w.Code != http.StatusNotFound {
				t.Fatalf("%s %s: %d for a body of %d bytes", c.method, c.path, w.Code, len(body))
			}
		case http.StatusRequestEntityTooLarge:
			if len(body) <= pluginMaxBody {
				t.Fatalf("%s %s: 413 for a body of %d bytes", c.method, c.path, len(body))
			}
		default:
			t.Fatalf("%s %s: status %d", c.method, c.path, w.Code)
		}
		if ct := w.Header().Get("Content-Type"); ct != dockerplugin.MediaType {
			t.Fatalf("%s %s: Content-Type %q", c.method, c.path, ct)
		}
		var answer map[string]any
		if err := json.Unmarshal(w.Body.Bytes(), &answer); err != nil || answer == nil {
			t.Fatalf("%s %s: %d answer %q is not a JSON object: %v", c.method, c.path, w.Code, w.Body.Bytes(), err)
		}
		if w.Code != http.StatusOK {
			if msg, ok := answer["Err"].(string); !ok || msg == "" {
				t.Fatalf("%s %s: %d answer %s without an Err", c.method, c.path, w.Code, w.Body.Bytes())
			}
		}

		if trimmed := bytes.TrimSpace(body); c.parses && w.Code == http.StatusOK && len(trimmed) > 0 && !json.Valid(trimmed) {
			t.Fatalf("%s %s: 200 for a body that is not JSON: %q", c.method, c.path, body)
		}
		want := 0
		if c.backend && w.Code == http.StatusOK {
			want = 1
		}
		if b.calls != want {
			t.Fatalf("%s %s: %d answered after %d backend calls, want %d", c.method, c.path, w.Code, b.calls, want)
		}
		if b.emptyIDs != 0 {
			t.Fatalf("%s %s: the backend got %d empty IDs from %q", c.method, c.path, b.emptyIDs, body)
		}
	})
}
