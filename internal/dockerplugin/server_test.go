package dockerplugin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/dockerplugin"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// maxBody is the server's limit on a request body.
const maxBody = 1 << 20

// call is one Backend call as the recorder saw it: the method's name and
// its arguments after the context.
type call struct {
	Method string
	Args   []any
}

// recorder is a Backend that records its calls and answers with its
// fields. It is safe for concurrent use: the server calls it from its own
// goroutines while the test reads what it saw.
type recorder struct {
	// Answers, set before the first request.
	err      error // returned by every call that can fail
	endpoint dockerplugin.CreateEndpointResponse
	info     map[string]any
	join     dockerplugin.JoinResponse
	spaces   dockerplugin.AddressSpaces
	pool     dockerplugin.RequestPoolResponse
	addr     dockerplugin.RequestAddressResponse
	// hold, if not nil, is called on entry to every call, before it is
	// recorded: a test can make a call wait there.
	hold func()

	mu    sync.Mutex
	calls []call
}

var _ dockerplugin.Backend = (*recorder)(nil)

func (r *recorder) record(method string, args ...any) {
	if r.hold != nil {
		r.hold()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, call{method, args})
}

// seen returns the calls so far and forgets them.
func (r *recorder) seen() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.calls
	r.calls = nil
	return c
}

func (r *recorder) CreateNetwork(_ context.Context, req dockerplugin.CreateNetworkRequest) error {
	r.record("CreateNetwork", req)
	return r.err
}

func (r *recorder) DeleteNetwork(_ context.Context, networkID string) error {
	r.record("DeleteNetwork", networkID)
	return r.err
}

func (r *recorder) CreateEndpoint(_ context.Context, req dockerplugin.CreateEndpointRequest) (dockerplugin.CreateEndpointResponse, error) {
	r.record("CreateEndpoint", req)
	return r.endpoint, r.err
}

func (r *recorder) DeleteEndpoint(_ context.Context, networkID, endpointID string) error {
	r.record("DeleteEndpoint", networkID, endpointID)
	return r.err
}

func (r *recorder) EndpointInfo(_ context.Context, networkID, endpointID string) (map[string]any, error) {
	r.record("EndpointInfo", networkID, endpointID)
	return r.info, r.err
}

func (r *recorder) Join(_ context.Context, req dockerplugin.JoinRequest) (dockerplugin.JoinResponse, error) {
	r.record("Join", req)
	return r.join, r.err
}

func (r *recorder) Leave(_ context.Context, networkID, endpointID string) error {
	r.record("Leave", networkID, endpointID)
	return r.err
}

func (r *recorder) AddressSpaces() dockerplugin.AddressSpaces {
	r.record("AddressSpaces")
	return r.spaces
}

func (r *recorder) RequestPool(_ context.Context, req dockerplugin.RequestPoolRequest) (dockerplugin.RequestPoolResponse, error) {
	r.record("RequestPool", req)
	return r.pool, r.err
}

func (r *recorder) ReleasePool(_ context.Context, poolID string) error {
	r.record("ReleasePool", poolID)
	return r.err
}

func (r *recorder) RequestAddress(_ context.Context, req dockerplugin.RequestAddressRequest) (dockerplugin.RequestAddressResponse, error) {
	r.record("RequestAddress", req)
	return r.addr, r.err
}

func (r *recorder) ReleaseAddress(_ context.Context, poolID, address string) error {
	r.record("ReleaseAddress", poolID, address)
	return r.err
}

// client speaks HTTP to one plugin socket, as Docker does.
type client struct {
	http *http.Client
}

func newClient(t *testing.T, path string) *client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &client{http: &http.Client{Transport: tr}}
}

// answer is a response, read whole.
type answer struct {
	status int
	header http.Header
	body   []byte
}

// do sends one request and reads its answer; a transport error ends the test.
func (c *client) do(t *testing.T, method, path string, body []byte) answer {
	t.Helper()
	a, err := c.try(t.Context(), method, path, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return a
}

func (c *client) try(ctx context.Context, method, path string, body []byte) (answer, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://d"+path, bytes.NewReader(body))
	if err != nil {
		return answer{}, err
	}
	req.Header.Set("Accept", "application/vnd.docker.plugins.v1.2+json") // Docker's
	resp, err := c.http.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	return answer{resp.StatusCode, resp.Header, b}, nil
}

func (c *client) post(t *testing.T, path, body string) answer {
	t.Helper()
	return c.do(t, http.MethodPost, path, []byte(body))
}

// serve listens on dir/name.sock and runs the server until the test
// ends; then it checks that Run returned nil and removed the socket.
func serve(t *testing.T, dir, name string, b dockerplugin.Backend) *dockerplugin.Server {
	t.Helper()
	s, err := dockerplugin.Listen(dir, name, b, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(t.Context()) }() // t.Context ends before the cleanups run
	t.Cleanup(func() {
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if _, err := os.Lstat(s.Path()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after Run: socket %s: %v, want it removed", s.Path(), err)
		}
	})
	return s
}

// start serves b on a socket of its own and returns a client for it.
func start(t *testing.T, b dockerplugin.Backend) *client {
	t.Helper()
	s := serve(t, t.TempDir(), "weavemesh", b)
	return newClient(t, s.Path())
}

// checkJSON checks that got is the JSON value want, field names and all.
func checkJSON(t *testing.T, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("answer %q is not JSON: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want %q: %v", want, err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("answer\n got %s\nwant %s", bytes.TrimSpace(got), want)
	}
}

// checkOK checks a successful answer: 200, Docker's media type, the JSON value want.
func checkOK(t *testing.T, a answer, want string) {
	t.Helper()
	if a.status != http.StatusOK {
		t.Fatalf("status %d (%s), want 200", a.status, bytes.TrimSpace(a.body))
	}
	if ct := a.header.Get("Content-Type"); ct != dockerplugin.MediaType {
		t.Errorf("Content-Type %q, want %q", ct, dockerplugin.MediaType)
	}
	checkJSON(t, a.body, want)
}

// checkErr checks an error answer: the status, Docker's media type, and
// a body that is exactly {"Err": msg}. An empty msg accepts any non-empty
// message.
func checkErr(t *testing.T, a answer, status int, msg string) {
	t.Helper()
	if a.status != status {
		t.Errorf("status %d, want %d (%s)", a.status, status, bytes.TrimSpace(a.body))
	}
	if ct := a.header.Get("Content-Type"); ct != dockerplugin.MediaType {
		t.Errorf("Content-Type %q, want %q", ct, dockerplugin.MediaType)
	}
	var e map[string]any
	if err := json.Unmarshal(a.body, &e); err != nil {
		t.Fatalf("error answer %q is not a JSON object: %v", a.body, err)
	}
	got, ok := e["Err"].(string)
	if !ok || len(e) != 1 {
		t.Fatalf("error answer %s, want only a string Err", bytes.TrimSpace(a.body))
	}
	if got == "" || msg != "" && got != msg {
		t.Errorf("Err %q, want %q", got, msg)
	}
}

func checkCalls(t *testing.T, got, want []call) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("backend calls\n got %#v\nwant %#v", got, want)
	}
}

func TestActivate(t *testing.T) {
	b := &recorder{}
	c := start(t, b)
	checkOK(t, c.post(t, "/Plugin.Activate", ""), `{"Implements":["NetworkDriver","IpamDriver"]}`)
	checkCalls(t, b.seen(), nil)
}

func TestGetCapabilities(t *testing.T) {
	b := &recorder{}
	c := start(t, b)
	checkOK(t, c.post(t, "/NetworkDriver.GetCapabilities", ""), `{"Scope":"local","ConnectivityScope":"global"}`)
	checkOK(t, c.post(t, "/IpamDriver.GetCapabilities", ""), `{"RequiresMACAddress":false,"RequiresRequestReplay":false}`)
	checkCalls(t, b.seen(), nil)
}

// callTest is one request, the backend calls it should make, and the answer.
type callTest struct {
	name   string
	path   string
	body   string    // as Docker sends it
	answer *recorder // the backend's answers; nil for none
	want   []call
	reply  string // the answer's JSON, or for an error its Err
	status int    // 0 for 200
}

func runCalls(t *testing.T, tests []callTest) {
	t.Helper()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.answer
			if b == nil {
				b = &recorder{}
			}
			a := start(t, b).post(t, tt.path, tt.body)
			if tt.status == 0 {
				checkOK(t, a, tt.reply)
			} else {
				checkErr(t, a, tt.status, tt.reply)
			}
			checkCalls(t, b.seen(), tt.want)
		})
	}
}

// dockerEndpointOptions is what Docker puts in the Options of
// CreateEndpoint and Join for a container that publishes no ports.
const dockerEndpointOptions = `{"com.docker.network.endpoint.exposedports":[],"com.docker.network.portmap":[]}`

func dockerEndpointOptionsValue() map[string]any {
	return map[string]any{"com.docker.network.endpoint.exposedports": []any{}, "com.docker.network.portmap": []any{}}
}

func TestNetworkDriver(t *testing.T) {
	const sandbox = "/var/run/docker/netns/8d3e2b3f1a2c"
	runCalls(t, []callTest{{
		name: "CreateNetwork",
		path: "/NetworkDriver.CreateNetwork",
		body: `{"NetworkID":"n1","Options":{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{}},` +
			`"IPv4Data":[{"AddressSpace":"weavelocal","Pool":"10.32.0.0/24","Gateway":"10.32.0.1/24","AuxAddresses":{"host1":"10.32.0.5/24"}}],"IPv6Data":[]}`,
		want: []call{{"CreateNetwork", []any{dockerplugin.CreateNetworkRequest{
			NetworkID: "n1",
			Options:   map[string]any{"com.docker.network.enable_ipv6": false, "com.docker.network.generic": map[string]any{}},
			IPv4Data: []dockerplugin.IPAMData{{AddressSpace: "weavelocal", Pool: "10.32.0.0/24", Gateway: "10.32.0.1/24",
				AuxAddresses: map[string]string{"host1": "10.32.0.5/24"}}},
			IPv6Data: []dockerplugin.IPAMData{},
		}}}},
		reply: `{}`,
	}, {
		name: "CreateNetwork/brief",
		path: "/NetworkDriver.CreateNetwork",
		body: `{"NetworkID":"n1","Options":{"com.docker.network.generic":{}},"IPv4Data":[{"AddressSpace":"weavelocal","Pool":"10.32.0.0/24","Gateway":"10.32.0.0/24"}],"IPv6Data":[]}`,
		want: []call{{"CreateNetwork", []any{dockerplugin.CreateNetworkRequest{
			NetworkID: "n1",
			Options:   map[string]any{"com.docker.network.generic": map[string]any{}},
			IPv4Data:  []dockerplugin.IPAMData{{AddressSpace: "weavelocal", Pool: "10.32.0.0/24", Gateway: "10.32.0.0/24"}},
			IPv6Data:  []dockerplugin.IPAMData{},
		}}}},
		reply: `{}`,
	}, {
		name:  "DeleteNetwork",
		path:  "/NetworkDriver.DeleteNetwork",
		body:  `{"NetworkID":"n1"}`,
		want:  []call{{"DeleteNetwork", []any{"n1"}}},
		reply: `{}`,
	}, {
		name: "CreateEndpoint/MAC chosen",
		path: "/NetworkDriver.CreateEndpoint",
		body: `{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.32.0.2/24","AddressIPv6":"","MacAddress":""},` +
			`"Options":` + dockerEndpointOptions + `}`,
		answer: &recorder{endpoint: dockerplugin.CreateEndpointResponse{
			Interface: &dockerplugin.EndpointInterface{MacAddress: "7a:1b:2c:3d:4e:5f"}}},
		want: []call{{"CreateEndpoint", []any{dockerplugin.CreateEndpointRequest{
			NetworkID: "n1", EndpointID: "e1",
			Interface: &dockerplugin.EndpointInterface{Address: "10.32.0.2/24"},
			Options:   dockerEndpointOptionsValue(),
		}}}},
		// Only the field the driver chose: Docker refuses an answer that
		// repeats or changes a field the request gave.
		reply: `{"Interface":{"MacAddress":"7a:1b:2c:3d:4e:5f"}}`,
	}, {
		name: "CreateEndpoint/nothing chosen",
		path: "/NetworkDriver.CreateEndpoint",
		body: `{"NetworkID":"n1","EndpointID":"e2","Interface":{"Address":"10.32.0.3/24","MacAddress":"02:42:0a:20:00:03"},"Options":{}}`,
		want: []call{{"CreateEndpoint", []any{dockerplugin.CreateEndpointRequest{
			NetworkID: "n1", EndpointID: "e2",
			Interface: &dockerplugin.EndpointInterface{Address: "10.32.0.3/24", MacAddress: "02:42:0a:20:00:03"},
			Options:   map[string]any{},
		}}}},
		reply: `{}`,
	}, {
		name:  "DeleteEndpoint",
		path:  "/NetworkDriver.DeleteEndpoint",
		body:  `{"NetworkID":"n1","EndpointID":"e1"}`,
		want:  []call{{"DeleteEndpoint", []any{"n1", "e1"}}},
		reply: `{}`,
	}, {
		name:   "EndpointOperInfo",
		path:   "/NetworkDriver.EndpointOperInfo",
		body:   `{"NetworkID":"n1","EndpointID":"e1"}`,
		answer: &recorder{info: map[string]any{"ifname": "vethwepl1", "mtu": 1376}},
		want:   []call{{"EndpointInfo", []any{"n1", "e1"}}},
		reply:  `{"Value":{"ifname":"vethwepl1","mtu":1376}}`,
	}, {
		name: "Join",
		path: "/NetworkDriver.Join",
		body: `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"` + sandbox + `","Options":` + dockerEndpointOptions + `}`,
		answer: &recorder{join: dockerplugin.JoinResponse{
			InterfaceName: dockerplugin.InterfaceName{SrcName: "vethwepg1", DstPrefix: "ethwe"},
			StaticRoutes: []dockerplugin.StaticRoute{
				{Destination: "10.32.0.0/12", RouteType: dockerplugin.RouteConnected},
				{Destination: "224.0.0.0/4", RouteType: dockerplugin.RouteNextHop, NextHop: "10.32.0.1"},
			},
		}},
		want: []call{{"Join", []any{dockerplugin.JoinRequest{
			NetworkID: "n1", EndpointID: "e1", SandboxKey: sandbox, Options: dockerEndpointOptionsValue(),
		}}}},
		// No Gateway: Docker then connects the container to its gateway bridge.
		reply: `{"InterfaceName":{"SrcName":"vethwepg1","DstPrefix":"ethwe"},"StaticRoutes":[` +
			`{"Destination":"10.32.0.0/12","RouteType":1},{"Destination":"224.0.0.0/4","RouteType":0,"NextHop":"10.32.0.1"}],` +
			`"DisableGatewayService":false}`,
	}, {
		name: "Join/gateway",
		path: "/NetworkDriver.Join",
		body: `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"` + sandbox + `"}`,
		answer: &recorder{join: dockerplugin.JoinResponse{
			InterfaceName:         dockerplugin.InterfaceName{SrcName: "vethwepg1", DstPrefix: "ethwe"},
			Gateway:               "10.32.0.1",
			DisableGatewayService: true,
		}},
		want:  []call{{"Join", []any{dockerplugin.JoinRequest{NetworkID: "n1", EndpointID: "e1", SandboxKey: sandbox}}}},
		reply: `{"InterfaceName":{"SrcName":"vethwepg1","DstPrefix":"ethwe"},"Gateway":"10.32.0.1","DisableGatewayService":true}`,
	}, {
		name:  "Leave",
		path:  "/NetworkDriver.Leave",
		body:  `{"NetworkID":"n1","EndpointID":"e1"}`,
		want:  []call{{"Leave", []any{"n1", "e1"}}},
		reply: `{}`,
	}, {
		name:  "DiscoverNew",
		path:  "/NetworkDriver.DiscoverNew",
		body:  `{"DiscoveryType":1,"DiscoveryData":{"Address":"192.168.1.2","BindAddress":"0.0.0.0","Self":true}}`,
		reply: `{}`,
	}, {
		name:  "DiscoverDelete",
		path:  "/NetworkDriver.DiscoverDelete",
		body:  `{"DiscoveryType":1,"DiscoveryData":{"Address":"192.168.1.2","BindAddress":"0.0.0.0","Self":true}}`,
		reply: `{}`,
	}, {
		name:  "ProgramExternalConnectivity",
		path:  "/NetworkDriver.ProgramExternalConnectivity",
		body:  `{"NetworkID":"n1","EndpointID":"e1","Options":{"com.docker.network.endpoint.exposedports":[],"com.docker.network.portmap":[]}}`,
		reply: `{}`,
	}, {
		name:  "RevokeExternalConnectivity",
		path:  "/NetworkDriver.RevokeExternalConnectivity",
		body:  `{"NetworkID":"n1","EndpointID":"e1"}`,
		reply: `{}`,
	}, {
		name:   "AllocateNetwork",
		path:   "/NetworkDriver.AllocateNetwork",
		body:   `{"NetworkID":"n1","Options":{},"IPv4Data":[],"IPv6Data":[]}`,
		status: http.StatusBadRequest,
		reply:  "AllocateNetwork is not supported (swarm-scoped networks)",
	}, {
		name:   "FreeNetwork",
		path:   "/NetworkDriver.FreeNetwork",
		body:   `{"NetworkID":"n1"}`,
		status: http.StatusBadRequest,
		reply:  "FreeNetwork is not supported (swarm-scoped networks)",
	}})
}

func TestIpamDriver(t *testing.T) {
	runCalls(t, []callTest{{
		name:   "GetDefaultAddressSpaces",
		path:   "/IpamDriver.GetDefaultAddressSpaces",
		answer: &recorder{spaces: dockerplugin.AddressSpaces{LocalDefaultAddressSpace: "weavelocal", GlobalDefaultAddressSpace: "weaveglobal"}},
		want:   []call{{"AddressSpaces", nil}},
		reply:  `{"LocalDefaultAddressSpace":"weavelocal","GlobalDefaultAddressSpace":"weaveglobal"}`,
	}, {
		name: "RequestPool/subnet and range",
		path: "/IpamDriver.RequestPool",
		body: `{"AddressSpace":"weavelocal","Pool":"10.32.0.0/16","SubPool":"10.32.1.0/24","Options":{"works":"yes"},"V6":false}`,
		answer: &recorder{pool: dockerplugin.RequestPoolResponse{PoolID: "weavelocal-10.32.0.0/16-10.32.1.0/24",
			Pool: "10.32.0.0/16", Data: map[string]string{"com.docker.network.gateway": "10.32.0.1/16"}}},
		want: []call{{"RequestPool", []any{dockerplugin.RequestPoolRequest{AddressSpace: "weavelocal",
			Pool: "10.32.0.0/16", SubPool: "10.32.1.0/24", Options: map[string]string{"works": "yes"}}}}},
		reply: `{"PoolID":"weavelocal-10.32.0.0/16-10.32.1.0/24","Pool":"10.32.0.0/16","Data":{"com.docker.network.gateway":"10.32.0.1/16"}}`,
	}, {
		name:   "RequestPool/default",
		path:   "/IpamDriver.RequestPool",
		body:   `{"AddressSpace":"weavelocal","Pool":"","SubPool":"","Options":null,"V6":false}`,
		answer: &recorder{pool: dockerplugin.RequestPoolResponse{PoolID: "weavelocal", Pool: "10.32.0.0/12"}},
		want:   []call{{"RequestPool", []any{dockerplugin.RequestPoolRequest{AddressSpace: "weavelocal"}}}},
		reply:  `{"PoolID":"weavelocal","Pool":"10.32.0.0/12","Data":null}`,
	}, {
		name:  "RequestPool/IPv6",
		path:  "/IpamDriver.RequestPool",
		body:  `{"AddressSpace":"weavelocal","Pool":"","SubPool":"","Options":{},"V6":true}`,
		want:  []call{{"RequestPool", []any{dockerplugin.RequestPoolRequest{AddressSpace: "weavelocal", Options: map[string]string{}, V6: true}}}},
		reply: `{"PoolID":"","Pool":"","Data":null}`,
	}, {
		name:  "ReleasePool",
		path:  "/IpamDriver.ReleasePool",
		body:  `{"PoolID":"weavelocal-10.32.0.0/16"}`,
		want:  []call{{"ReleasePool", []any{"weavelocal-10.32.0.0/16"}}},
		reply: `{}`,
	}, {
		name:   "RequestAddress/gateway",
		path:   "/IpamDriver.RequestAddress",
		body:   `{"PoolID":"weavelocal-10.32.0.0/16","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}`,
		answer: &recorder{addr: dockerplugin.RequestAddressResponse{Address: "10.32.0.1/16"}},
		want: []call{{"RequestAddress", []any{dockerplugin.RequestAddressRequest{PoolID: "weavelocal-10.32.0.0/16",
			Options: map[string]string{dockerplugin.RequestAddressType: dockerplugin.GatewayRequest}}}}},
		reply: `{"Address":"10.32.0.1/16","Data":null}`,
	}, {
		name: "RequestAddress/wanted",
		path: "/IpamDriver.RequestAddress",
		body: `{"PoolID":"weavelocal-10.32.0.0/16","Address":"10.32.0.7","Options":{"com.docker.network.endpoint.macaddress":"02:42:0a:20:00:07"}}`,
		answer: &recorder{addr: dockerplugin.RequestAddressResponse{Address: "10.32.0.7/16",
			Data: map[string]string{"k": "v"}}},
		want: []call{{"RequestAddress", []any{dockerplugin.RequestAddressRequest{PoolID: "weavelocal-10.32.0.0/16",
			Address: "10.32.0.7", Options: map[string]string{"com.docker.network.endpoint.macaddress": "02:42:0a:20:00:07"}}}}},
		reply: `{"Address":"10.32.0.7/16","Data":{"k":"v"}}`,
	}, {
		name:  "ReleaseAddress",
		path:  "/IpamDriver.ReleaseAddress",
		body:  `{"PoolID":"weavelocal-10.32.0.0/16","Address":"10.32.0.7"}`,
		want:  []call{{"ReleaseAddress", []any{"weavelocal-10.32.0.0/16", "10.32.0.7"}}},
		reply: `{}`,
	}})
}

// backendCalls are valid requests for every call that reaches the
// backend and can fail, with the backend method each calls.
var backendCalls = []struct{ path, body, method string }{
	{"/NetworkDriver.CreateNetwork", `{"NetworkID":"n1","Options":{},"IPv4Data":[],"IPv6Data":[]}`, "CreateNetwork"},
	{"/NetworkDriver.DeleteNetwork", `{"NetworkID":"n1"}`, "DeleteNetwork"},
	{"/NetworkDriver.CreateEndpoint", `{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.32.0.2/24"}}`, "CreateEndpoint"},
	{"/NetworkDriver.DeleteEndpoint", `{"NetworkID":"n1","EndpointID":"e1"}`, "DeleteEndpoint"},
	{"/NetworkDriver.EndpointOperInfo", `{"NetworkID":"n1","EndpointID":"e1"}`, "EndpointInfo"},
	{"/NetworkDriver.Join", `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/var/run/docker/netns/x"}`, "Join"},
	{"/NetworkDriver.Leave", `{"NetworkID":"n1","EndpointID":"e1"}`, "Leave"},
	{"/IpamDriver.RequestPool", `{"AddressSpace":"weavelocal","Pool":"","SubPool":"","Options":{},"V6":false}`, "RequestPool"},
	{"/IpamDriver.ReleasePool", `{"PoolID":"p1"}`, "ReleasePool"},
	{"/IpamDriver.RequestAddress", `{"PoolID":"p1","Address":"","Options":{}}`, "RequestAddress"},
	{"/IpamDriver.ReleaseAddress", `{"PoolID":"p1","Address":"10.32.0.7"}`, "ReleaseAddress"},
}

func TestBackendErrors(t *testing.T) {
	tests := []struct {
		name   string
		err    error
		status int
		msg    string
	}{
		{"bad request", dockerplugin.BadRequest("weavemesh networks are IPv4 only"), http.StatusBadRequest,
			"weavemesh networks are IPv4 only"},
		{"bad request wrapped", fmt.Errorf("claiming: %w", dockerplugin.BadRequest("subnet 10.0.0.0/8 is not inside 10.32.0.0/12")),
			http.StatusBadRequest, "claiming: subnet 10.0.0.0/8 is not inside 10.32.0.0/12"},
		{"not found", dockerplugin.NotFound("endpoint e1 was never created here"), http.StatusNotFound,
			"endpoint e1 was never created here"},
		{"other", errors.New("ipalloc: the allocator is not ready"), http.StatusInternalServerError, "ipalloc: the allocator is not ready"},
		{"other mentioning not found", errors.New("netlink: not found: file exists"), http.StatusInternalServerError,
			"netlink: not found: file exists"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &recorder{err: tt.err}
			c := start(t, b)
			for _, bc := range backendCalls {
				t.Run(strings.TrimPrefix(bc.path, "/"), func(t *testing.T) {
					a := c.post(t, bc.path, bc.body)
					if got := b.seen(); len(got) != 1 || got[0].Method != bc.method {
						t.Errorf("backend calls %#v, want one %s", got, bc.method)
					}
					checkErr(t, a, tt.status, tt.msg)
				})
			}
		})
	}
}

// bodyCalls are the calls that parse their request.
var bodyCalls = []string{
	"/NetworkDriver.CreateNetwork", "/NetworkDriver.DeleteNetwork", "/NetworkDriver.CreateEndpoint",
	"/NetworkDriver.DeleteEndpoint", "/NetworkDriver.EndpointOperInfo", "/NetworkDriver.Join", "/NetworkDriver.Leave",
	"/IpamDriver.RequestPool", "/IpamDriver.ReleasePool", "/IpamDriver.RequestAddress", "/IpamDriver.ReleaseAddress",
}

func TestMalformedRequest(t *testing.T) {
	bodies := []struct{ name, body string }{
		{"truncated", `{"NetworkID":"n1","EndpointID":`},
		{"garbage", `NetworkID=n1`},
		{"trailing garbage", `{"NetworkID":"n1","EndpointID":"e1","PoolID":"p1","Address":"a","SandboxKey":"s"} x`},
		{"two objects", `{"NetworkID":"n1"}{"NetworkID":"n2"}`},
		{"array", `[{"NetworkID":"n1"}]`},
		{"string", `"n1"`},
		{"number", `42`},
		{"ID of the wrong type", `{"NetworkID":1,"EndpointID":2,"PoolID":3,"Address":4,"SandboxKey":5,"AddressSpace":6}`},
		// Options is ignored by the calls that have none, but its value
		// must still be JSON.
		{"nesting too deep", `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"s","PoolID":"p1","Address":"a","Options":{"x":` +
			strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}}`},
		{"bad value in Options", `{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"s","PoolID":"p1","Address":"a","Options":{"x":tru}}`},
	}
	// Calls whose request has Options refuse Options that are not an
	// object; the IPAM driver's Options hold only strings.
	const (
		optionsNotObject    = `{"NetworkID":"n1","EndpointID":"e1","PoolID":"p1","SandboxKey":"s","Options":"x"}`
		optionsNotOfStrings = `{"PoolID":"p1","Options":{"x":["y"]}}`
	)
	extra := map[string][]string{
		"/NetworkDriver.CreateNetwork":  {optionsNotObject},
		"/NetworkDriver.CreateEndpoint": {optionsNotObject},
		"/NetworkDriver.Join":           {optionsNotObject},
		"/IpamDriver.RequestPool":       {optionsNotObject, optionsNotOfStrings},
		"/IpamDriver.RequestAddress":    {optionsNotObject, optionsNotOfStrings},
	}
	b := &recorder{}
	c := start(t, b)
	for _, path := range bodyCalls {
		bodies := bodies[:len(bodies):len(bodies)]
		for i, body := range extra[path] {
			bodies = append(bodies, struct{ name, body string }{fmt.Sprintf("bad Options %d", i), body})
		}
		for _, bb := range bodies {
			t.Run(strings.TrimPrefix(path, "/")+"/"+bb.name, func(t *testing.T) {
				a := c.post(t, path, bb.body)
				checkCalls(t, b.seen(), nil)
				checkErr(t, a, http.StatusBadRequest, "")
				if !strings.Contains(string(a.body), "the request is not valid JSON of the expected shape") {
					t.Errorf("Err does not say the request is malformed: %s", a.body)
				}
				if strings.Contains(string(a.body), "bad request") {
					t.Errorf("Err keeps the sentinel's text: %s", a.body)
				}
			})
		}
	}
}

func TestMissingIDs(t *testing.T) {
	const (
		netOrEndpoint = "the request lacks NetworkID or EndpointID"
		poolAndAddr   = "the request lacks PoolID and Address"
	)
	tests := []struct{ path, body, msg string }{
		{"/NetworkDriver.CreateNetwork", `{"Options":{},"IPv4Data":[{"AddressSpace":"weavelocal","Pool":"10.32.0.0/24"}],"IPv6Data":[]}`, "the request lacks NetworkID"},
		{"/NetworkDriver.CreateNetwork", `{"NetworkID":""}`, "the request lacks NetworkID"},
		{"/NetworkDriver.CreateNetwork", ``, "the request lacks NetworkID"},
		{"/NetworkDriver.DeleteNetwork", `{}`, "the request lacks NetworkID"},
		{"/NetworkDriver.DeleteNetwork", `null`, "the request lacks NetworkID"},
		{"/NetworkDriver.CreateEndpoint", `{"EndpointID":"e1","Interface":{"Address":"10.32.0.2/24"}}`, netOrEndpoint},
		{"/NetworkDriver.CreateEndpoint", `{"NetworkID":"n1","Interface":{"Address":"10.32.0.2/24"}}`, netOrEndpoint},
		{"/NetworkDriver.DeleteEndpoint", `{"NetworkID":"n1"}`, netOrEndpoint},
		{"/NetworkDriver.DeleteEndpoint", `{"EndpointID":"e1"}`, netOrEndpoint},
		{"/NetworkDriver.EndpointOperInfo", `{"NetworkID":"n1"}`, netOrEndpoint},
		{"/NetworkDriver.EndpointOperInfo", `{"EndpointID":"e1"}`, netOrEndpoint},
		{"/NetworkDriver.Join", `{"EndpointID":"e1","SandboxKey":"/var/run/docker/netns/x"}`, netOrEndpoint},
		{"/NetworkDriver.Join", `{"NetworkID":"n1","SandboxKey":"/var/run/docker/netns/x"}`, netOrEndpoint},
		{"/NetworkDriver.Join", `{"NetworkID":"n1","EndpointID":"e1"}`, "the request lacks SandboxKey"},
		{"/NetworkDriver.Leave", `{"NetworkID":"n1"}`, netOrEndpoint},
		{"/NetworkDriver.Leave", `{"EndpointID":"e1"}`, netOrEndpoint},
		{"/IpamDriver.ReleasePool", `{}`, "the request lacks PoolID"},
		{"/IpamDriver.RequestAddress", `{"Address":"10.32.0.7","Options":{}}`, "the request lacks PoolID"},
		{"/IpamDriver.ReleaseAddress", `{"Address":"10.32.0.7"}`, poolAndAddr},
		{"/IpamDriver.ReleaseAddress", `{"PoolID":"p1"}`, poolAndAddr},
	}
	b := &recorder{}
	c := start(t, b)
	for _, tt := range tests {
		t.Run(strings.TrimPrefix(tt.path, "/")+tt.body, func(t *testing.T) {
			a := c.post(t, tt.path, tt.body)
			checkCalls(t, b.seen(), nil)
			checkErr(t, a, http.StatusBadRequest, tt.msg)
		})
	}
}

func TestMethodNotAllowed(t *testing.T) {
	b := &recorder{}
	c := start(t, b)
	for _, method := range []string{http.MethodGet, http.MethodPut, http.MethodDelete, http.MethodHead} {
		for _, path := range []string{"/Plugin.Activate", "/NetworkDriver.Join", "/IpamDriver.RequestPool", "/IpamDriver.GetCapabilities"} {
			t.Run(method+path, func(t *testing.T) {
				a := c.do(t, method, path, []byte(`{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"s"}`))
				checkCalls(t, b.seen(), nil)
				if method == http.MethodHead {
					if a.status != http.StatusMethodNotAllowed || len(a.body) != 0 {
						t.Errorf("HEAD: status %d, body %q; want 405 without a body", a.status, a.body)
					}
				} else {
					checkErr(t, a, http.StatusMethodNotAllowed, method+" "+path+": plugin calls are POSTs")
				}
				if allow := a.header.Get("Allow"); allow != http.MethodPost {
					t.Errorf("Allow %q, want POST", allow)
				}
			})
		}
	}
}

func TestUnknownCall(t *testing.T) {
	b := &recorder{}
	c := start(t, b)
	for _, path := range []string{"/", "/NetworkDriver.Nope", "/networkdriver.join", "/Plugin.Activate/x", "/VolumeDriver.Create", "/NetworkDriver"} {
		t.Run(path, func(t *testing.T) {
			a := c.post(t, path, `{"NetworkID":"n1"}`)
			checkCalls(t, b.seen(), nil)
			checkErr(t, a, http.StatusNotFound, "unknown plugin call "+path)
		})
	}
}

func TestEmptyBody(t *testing.T) {
	tests := []struct {
		path  string
		want  []call
		reply string
	}{
		{"/Plugin.Activate", nil, `{"Implements":["NetworkDriver","IpamDriver"]}`},
		{"/NetworkDriver.GetCapabilities", nil, `{"Scope":"local","ConnectivityScope":"global"}`},
		{"/IpamDriver.GetCapabilities", nil, `{"RequiresMACAddress":false,"RequiresRequestReplay":false}`},
		{"/IpamDriver.GetDefaultAddressSpaces", []call{{"AddressSpaces", nil}},
			`{"LocalDefaultAddressSpace":"weavelocal","GlobalDefaultAddressSpace":"weaveglobal"}`},
		{"/NetworkDriver.DiscoverNew", nil, `{}`},
		{"/NetworkDriver.RevokeExternalConnectivity", nil, `{}`},
		// RequestPool's fields are all optional: no body asks for the default pool.
		{"/IpamDriver.RequestPool", []call{{"RequestPool", []any{dockerplugin.RequestPoolRequest{}}}}, `{"PoolID":"","Pool":"","Data":null}`},
	}
	b := &recorder{spaces: dockerplugin.AddressSpaces{LocalDefaultAddressSpace: "weavelocal", GlobalDefaultAddressSpace: "weaveglobal"}}
	c := start(t, b)
	for _, tt := range tests {
		for _, body := range []string{"", "{}", "{}\n", " \r\n\t"} {
			t.Run(fmt.Sprintf("%s%q", tt.path, body), func(t *testing.T) {
				a := c.post(t, tt.path, body)
				checkCalls(t, b.seen(), tt.want)
				checkOK(t, a, tt.reply)
			})
		}
	}
}

// createNetworkOfSize is a valid CreateNetwork request of exactly n bytes.
func createNetworkOfSize(t *testing.T, n int) (body string, pad string) {
	t.Helper()
	const head, tail = `{"NetworkID":"n1","Options":{"pad":"`, `"}}`
	if n < len(head)+len(tail) {
		t.Fatalf("no request of %d bytes", n)
	}
	pad = strings.Repeat("x", n-len(head)-len(tail))
	return head + pad + tail, pad
}

func TestBodyLimit(t *testing.T) {
	b := &recorder{}
	c := start(t, b)

	body, pad := createNetworkOfSize(t, maxBody)
	checkOK(t, c.post(t, "/NetworkDriver.CreateNetwork", body), `{}`)
	checkCalls(t, b.seen(), []call{{"CreateNetwork", []any{dockerplugin.CreateNetworkRequest{
		NetworkID: "n1", Options: map[string]any{"pad": pad}}}}})

	body, _ = createNetworkOfSize(t, maxBody+1)
	checkErr(t, c.post(t, "/NetworkDriver.CreateNetwork", body), http.StatusRequestEntityTooLarge, "")
	checkCalls(t, b.seen(), nil)

	// The server still answers: only that request was refused.
	checkOK(t, c.post(t, "/Plugin.Activate", ""), `{"Implements":["NetworkDriver","IpamDriver"]}`)
}

func TestListen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run", "docker", "plugins") // not there yet
	s := serve(t, dir, "weavemesh", &recorder{})
	if want := filepath.Join(dir, "weavemesh.sock"); s.Path() != want {
		t.Errorf("Path() = %q, want %q", s.Path(), want)
	}
	fi, err := os.Lstat(s.Path())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want a socket with 0660", fi.Mode())
	}
	checkOK(t, newClient(t, s.Path()).post(t, "/Plugin.Activate", ""), `{"Implements":["NetworkDriver","IpamDriver"]}`)
}

func TestListenBadDir(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err := dockerplugin.Listen(filepath.Join(file, "plugins"), "weavemesh", &recorder{}, zap.NewNop()); err == nil {
		s.Close()
		t.Fatal("Listen in a directory under a file succeeded")
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	dir := t.TempDir()
	live := serve(t, dir, "weavemesh", &recorder{})
	s, err := dockerplugin.Listen(dir, "weavemesh", &recorder{}, zap.NewNop())
	if err == nil {
		s.Close()
		t.Fatal("a second Listen on a live socket succeeded")
	}
	if !strings.Contains(err.Error(), "in use") || !strings.Contains(err.Error(), live.Path()) {
		t.Errorf("error %q does not say that %s is in use", err, live.Path())
	}
	// The live server keeps its socket.
	checkOK(t, newClient(t, live.Path()).post(t, "/Plugin.Activate", ""), `{"Implements":["NetworkDriver","IpamDriver"]}`)

	// Another name in the same directory is fine.
	other := serve(t, dir, "weave", &recorder{})
	checkOK(t, newClient(t, other.Path()).post(t, "/Plugin.Activate", ""), `{"Implements":["NetworkDriver","IpamDriver"]}`)
}

func TestListenReplacesStaleSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "weavemesh.sock")
	// A socket whose server died without removing it.
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		t.Fatal("the stale socket answers")
	}

	s := serve(t, dir, "weavemesh", &recorder{})
	checkOK(t, newClient(t, s.Path()).post(t, "/Plugin.Activate", ""), `{"Implements":["NetworkDriver","IpamDriver"]}`)
}

func TestRunStops(t *testing.T) {
	s, err := dockerplugin.Listen(t.TempDir(), "weavemesh", &recorder{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	c := newClient(t, s.Path())
	checkOK(t, c.post(t, "/Plugin.Activate", ""), `{"Implements":["NetworkDriver","IpamDriver"]}`) // leaves an idle connection

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	if _, err := os.Lstat(s.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket %s: %v, want it removed", s.Path(), err)
	}
	if _, err := c.try(t.Context(), http.MethodPost, "/Plugin.Activate", nil); err == nil {
		t.Error("a stopped server answered")
	}
}

// TestRunFinishesCalls: a call in progress when the context ends is
// answered before Run returns.
func TestRunFinishesCalls(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	b := &recorder{
		join: dockerplugin.JoinResponse{InterfaceName: dockerplugin.InterfaceName{SrcName: "vethwepg1", DstPrefix: "ethwe"}},
		hold: func() { close(entered); <-release },
	}
	s, err := dockerplugin.Listen(t.TempDir(), "weavemesh", b, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	c := newClient(t, s.Path())

	var a answer
	var callErr error
	var wg sync.WaitGroup
	wg.Go(func() {
		a, callErr = c.try(t.Context(), http.MethodPost, "/NetworkDriver.Join",
			[]byte(`{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/var/run/docker/netns/x"}`))
	})
	<-entered
	cancel()
	// Wait until the server stops taking connections, so that the call
	// is still in progress while it shuts down.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		conn, err := net.Dial("unix", s.Path())
		if err != nil {
			break
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("the server still takes connections after its context ended")
		}
	}
	select {
	case err := <-done:
		t.Fatalf("Run returned (%v) with a call in progress", err)
	default:
	}
	close(release)
	wg.Wait()
	if callErr != nil {
		t.Fatalf("the call in progress failed: %v", callErr)
	}
	checkOK(t, a, `{"InterfaceName":{"SrcName":"vethwepg1","DstPrefix":"ethwe"},"DisableGatewayService":false}`)
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	if _, err := os.Lstat(s.Path()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket %s: %v, want it removed", s.Path(), err)
	}
}

// TestConcurrentCalls: calls on several connections at once reach the
// backend whole (run it with -race).
func TestConcurrentCalls(t *testing.T) {
	b := &recorder{}
	c := start(t, b)
	const n = 16
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			a, err := c.try(t.Context(), http.MethodPost, "/NetworkDriver.DeleteNetwork", fmt.Appendf(nil, `{"NetworkID":"n%d"}`, i))
			if err != nil || a.status != http.StatusOK {
				t.Errorf("call %d: %v, %d %s", i, err, a.status, a.body)
			}
		})
	}
	wg.Wait()
	got := map[string]bool{}
	for _, c := range b.seen() {
		if c.Method != "DeleteNetwork" || len(c.Args) != 1 {
			t.Fatalf("unexpected call %#v", c)
		}
		got[c.Args[0].(string)] = true
	}
	for i := range n {
		if !got[fmt.Sprintf("n%d", i)] {
			t.Errorf("DeleteNetwork n%d never reached the backend", i)
		}
	}
}

// TestRunWaitsForServe: a Run cancelled at once returns only after its
// Serve goroutine is done, so that it cannot unlink the socket of the
// next server on the same path.
func TestRunWaitsForServe(t *testing.T) {
	dir := t.TempDir()
	for i := range 200 {
		s, err := dockerplugin.Listen(dir, "weavemesh", &recorder{}, zap.NewNop())
		if err != nil {
			t.Fatalf("round %d: Listen: %v", i, err)
		}
		if _, err := os.Lstat(s.Path()); err != nil {
			t.Fatalf("round %d: right after Listen: %v", i, err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if err := s.Run(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCloseBeforeRun: Close undoes a Listen that never ran: the socket
// stops accepting, under any name.
func TestCloseBeforeRun(t *testing.T) {
	dir := t.TempDir()
	s, err := dockerplugin.Listen(dir, "weavemesh", &recorder{}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	alias := filepath.Join(dir, "alias.sock")
	if err := os.Link(s.Path(), alias); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if c, err := net.Dial("unix", alias); err == nil {
		c.Close()
		t.Fatal("after Close the socket still accepts connections")
	}
	if _, err := os.Lstat(s.Path()); err == nil {
		t.Error("after Close the socket file is still there")
	}
}
