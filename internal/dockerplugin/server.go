package dockerplugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/serve"
)

// Dir is where Docker looks for plugin sockets: a driver's name is its
// socket's name without ".sock".
const Dir = "/run/docker/plugins"

// maxBody bounds a request: the largest real one is a few KiB.
const maxBody = 1 << 20

// Server serves the protocol on one socket.
type Server struct {
	path string
	ln   net.Listener
	http *http.Server
	b    Backend
	log  *zap.Logger
}

// Listen opens dir/name.sock. A socket left by a process that is gone is
// replaced; one that still answers is an error, and so is anything there
// that is not a socket.
func Listen(dir, name string, b Backend, log *zap.Logger) (*Server, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("docker plugin: %w", err)
	}
	path := filepath.Join(dir, name+".sock")
	if err := serve.ClaimSocket(path); errors.Is(err, serve.ErrSocketInUse) {
		return nil, fmt.Errorf("docker plugin: %s is in use: another plugin named %q is running", path, name)
	} else if err != nil {
		return nil, fmt.Errorf("docker plugin: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("docker plugin: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("docker plugin: %w", err)
	}
	s := &Server{path: path, ln: ln, b: b, log: log}
	s.http = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	return s, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Run serves until ctx ends, then removes the socket.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.http.Serve(s.ln) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		s.Close()
		return fmt.Errorf("docker plugin: %w", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.http.Shutdown(sctx)
	<-errc // Serve closes the listener (and so unlinks the socket) as it returns
	s.Close()
	return nil
}

// Close stops serving and removes the socket; it also undoes a Listen
// that was never Run.
func (s *Server) Close() {
	s.http.Close()
	s.ln.Close()
	serve.RemoveSocket(s.path)
}

// Handler is the protocol's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	reply := func(path string, fn func(ctx context.Context, body []byte) (any, error)) {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) { s.serve(w, r, fn) })
	}
	empty := func(context.Context, []byte) (any, error) { return struct{}{}, nil }
	unsupported := func(what string) func(context.Context, []byte) (any, error) {
		return func(context.Context, []byte) (any, error) {
			return nil, BadRequest("%s is not supported (swarm-scoped networks)", what)
		}
	}

	reply("/Plugin.Activate", func(context.Context, []byte) (any, error) {
		return map[string][]string{"Implements": {"NetworkDriver", "IpamDriver"}}, nil
	})

	reply("/NetworkDriver.GetCapabilities", func(context.Context, []byte) (any, error) {
		// Local scope: Docker keeps the network on this host only;
		// the overlay connects the hosts.
		return map[string]string{"Scope": "local", "ConnectivityScope": "global"}, nil
	})
	reply("/NetworkDriver.CreateNetwork", func(ctx context.Context, body []byte) (any, error) {
		var req CreateNetworkRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		if req.NetworkID == "" {
			return nil, missing("NetworkID")
		}
		return struct{}{}, s.b.CreateNetwork(ctx, req)
	})
	reply("/NetworkDriver.DeleteNetwork", byID("NetworkID", func(r idRequest) string { return r.NetworkID }, s.b.DeleteNetwork))
	reply("/NetworkDriver.CreateEndpoint", func(ctx context.Context, body []byte) (any, error) {
		var req CreateEndpointRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		if err := ids(req.NetworkID, req.EndpointID); err != nil {
			return nil, err
		}
		return s.b.CreateEndpoint(ctx, req)
	})
	// Calls that name only an endpoint: both IDs are required.
	endpoint := func(fn func(ctx context.Context, network, endpoint string) (any, error)) func(context.Context, []byte) (any, error) {
		return func(ctx context.Context, body []byte) (any, error) {
			var req struct{ NetworkID, EndpointID string }
			if err := decode(body, &req); err != nil {
				return nil, err
			}
			if err := ids(req.NetworkID, req.EndpointID); err != nil {
				return nil, err
			}
			return fn(ctx, req.NetworkID, req.EndpointID)
		}
	}
	reply("/NetworkDriver.DeleteEndpoint", endpoint(func(ctx context.Context, n, e string) (any, error) {
		return struct{}{}, s.b.DeleteEndpoint(ctx, n, e)
	}))
	reply("/NetworkDriver.EndpointOperInfo", endpoint(func(ctx context.Context, n, e string) (any, error) {
		v, err := s.b.EndpointInfo(ctx, n, e)
		return map[string]any{"Value": v}, err
	}))
	reply("/NetworkDriver.Join", func(ctx context.Context, body []byte) (any, error) {
		var req JoinRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		if err := ids(req.NetworkID, req.EndpointID); err != nil {
			return nil, err
		}
		if req.SandboxKey == "" {
			return nil, missing("SandboxKey")
		}
		return s.b.Join(ctx, req)
	})
	reply("/NetworkDriver.Leave", endpoint(func(ctx context.Context, n, e string) (any, error) {
		return struct{}{}, s.b.Leave(ctx, n, e)
	}))
	for _, p := range []string{"DiscoverNew", "DiscoverDelete", "ProgramExternalConnectivity", "RevokeExternalConnectivity"} {
		reply("/NetworkDriver."+p, empty)
	}
	reply("/NetworkDriver.AllocateNetwork", unsupported("AllocateNetwork"))
	reply("/NetworkDriver.FreeNetwork", unsupported("FreeNetwork"))

	reply("/IpamDriver.GetCapabilities", func(context.Context, []byte) (any, error) {
		return map[string]bool{"RequiresMACAddress": false, "RequiresRequestReplay": false}, nil
	})
	reply("/IpamDriver.GetDefaultAddressSpaces", func(context.Context, []byte) (any, error) {
		return s.b.AddressSpaces(), nil
	})
	reply("/IpamDriver.RequestPool", func(ctx context.Context, body []byte) (any, error) {
		var req RequestPoolRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		return s.b.RequestPool(ctx, req)
	})
	reply("/IpamDriver.ReleasePool", byID("PoolID", func(r idRequest) string { return r.PoolID }, s.b.ReleasePool))
	reply("/IpamDriver.RequestAddress", func(ctx context.Context, body []byte) (any, error) {
		var req RequestAddressRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		if req.PoolID == "" {
			return nil, missing("PoolID")
		}
		return s.b.RequestAddress(ctx, req)
	})
	reply("/IpamDriver.ReleaseAddress", func(ctx context.Context, body []byte) (any, error) {
		var req struct{ PoolID, Address string }
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		if req.PoolID == "" || req.Address == "" {
			return nil, missing("PoolID and Address")
		}
		return struct{}{}, s.b.ReleaseAddress(ctx, req.PoolID, req.Address)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, http.StatusNotFound, fmt.Sprintf("unknown plugin call %s", r.URL.Path))
	})
	return mux
}

// serve reads one request, calls fn and writes its answer.
func (s *Server) serve(w http.ResponseWriter, r *http.Request, fn func(context.Context, []byte) (any, error)) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeErr(w, http.StatusMethodNotAllowed, r.Method+" "+r.URL.Path+": plugin calls are POSTs")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		writeErr(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("%s: reading the request: %v", r.URL.Path, err))
		return
	}
	call := strings.TrimPrefix(r.URL.Path, "/")
	start := time.Now()
	out, err := fn(r.Context(), body)
	if err != nil {
		code := status(err)
		s.log.Warn("plugin call failed", zap.String("call", call), zap.Int("status", code), zap.Error(err))
		writeErr(w, code, err.Error())
		return
	}
	s.log.Debug("plugin call", zap.String("call", call), zap.ByteString("request", body),
		zap.Duration("took", time.Since(start)))
	b, err := json.Marshal(out)
	if err != nil {
		s.log.Error("plugin answer", zap.String("call", call), zap.Error(err))
		writeErr(w, http.StatusInternalServerError, fmt.Sprintf("%s: encoding the answer: %v", call, err))
		return
	}
	w.Header().Set("Content-Type", MediaType)
	w.Write(append(b, '\n'))
}

// decode parses a request body. Docker sends an empty body (or {}) to
// calls without arguments; null counts as {}; a body that is not a JSON
// object of the request's shape is refused.
func decode(body []byte, v any) error {
	if len(strings.TrimSpace(string(body))) == 0 {
		body = []byte("{}")
	}
	if err := json.Unmarshal(body, v); err != nil {
		return BadRequest("the request is not valid JSON of the expected shape: %v", err)
	}
	return nil
}

// idRequest is a request that names one network or pool.
type idRequest struct{ NetworkID, PoolID string }

// byID answers a call whose request names one object by field (which
// id reads), and whose answer is empty.
func byID(field string, id func(idRequest) string, do func(context.Context, string) error) func(context.Context, []byte) (any, error) {
	return func(ctx context.Context, body []byte) (any, error) {
		var req idRequest
		if err := decode(body, &req); err != nil {
			return nil, err
		}
		if id(req) == "" {
			return nil, missing(field)
		}
		return struct{}{}, do(ctx, id(req))
	}
}

func missing(what string) error {
	return BadRequest("the request lacks %s", what)
}

func ids(network, endpoint string) error {
	if network == "" || endpoint == "" {
		return missing("NetworkID or EndpointID")
	}
	return nil
}

// writeErr answers with Docker's error shape.
func writeErr(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", MediaType)
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(struct{ Err string }{msg})
}
