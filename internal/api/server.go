package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/overlayd/overlayd/internal/serve"
	"github.com/overlayd/overlayd/proto"
)

// maxBody bounds a request body.
const maxBody = 64 << 10

// Server serves the API on a unix socket.
type Server struct {
	path    string
	ln      net.Listener
	http    *http.Server
	log     *zap.Logger
	version string
}

// Listen creates the socket at path (mode 0600; the parent directory is
// created mode 0755 if missing). A stale socket left by a dead daemon is
// replaced; a live one is an error, and so is anything at path that is not
// a socket.
func Listen(path string, b Backend, version string, log *zap.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("api: creating the socket directory: %w", err)
	}
	if err := serve.ClaimSocket(path); errors.Is(err, serve.ErrSocketInUse) {
		return nil, fmt.Errorf("api: another overlayd is listening on %s", path)
	} else if err != nil {
		return nil, fmt.Errorf("api: %w", err)
	}
	// Create the socket with no access for anyone but root from the start.
	old := umask(0o177)
	ln, err := net.Listen("unix", path)
	umask(old)
	if err != nil {
		return nil, fmt.Errorf("api: listening on %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("api: %w", err)
	}
	s := &Server{path: path, ln: ln, log: log, version: version}
	mux := http.NewServeMux()
	// Go's profiles, for root only (the socket's mode): memory, goroutines,
	// CPU. Never on the metrics listener, which may face a network.
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := b.Status(r.Context())
		s.reply(w, st, err)
	})
	mux.HandleFunc("GET /v1/version", func(w http.ResponseWriter, r *http.Request) {
		s.reply(w, VersionInfo{Version: version, ProtocolMinVersion: proto.MinVersion,
			ProtocolMaxVersion: proto.MaxVersion}, nil)
	})
	peers := func(do func(context.Context, []string) error) http.HandlerFunc {
		return handle(s, func(ctx context.Context, req *PeersRequest) (any, error) { return nil, do(ctx, req.Peers) })
	}
	mux.HandleFunc("POST /v1/connect", peers(b.Connect))
	mux.HandleFunc("POST /v1/forget", peers(b.Forget))
	mux.HandleFunc("POST /v1/expose", handle(s, func(ctx context.Context, req *CIDRRequest) (any, error) {
		if req.CIDR.IsValid() {
			if err := checkCIDR(req.CIDR); err != nil {
				return nil, err
			}
		}
		got, err := b.Expose(ctx, req.CIDR)
		return AllocResponse{Address: got}, err
	}))
	mux.HandleFunc("POST /v1/hide", handle(s, func(ctx context.Context, req *CIDRRequest) (any, error) {
		if err := checkCIDR(req.CIDR); err != nil {
			return nil, err
		}
		return nil, b.Hide(ctx, req.CIDR)
	}))
	mux.HandleFunc("POST /v1/ipam/alloc", handle(s, func(ctx context.Context, req *AllocRequest) (any, error) {
		if req.Subnet.IsValid() {
			if err := checkCIDR(req.Subnet); err != nil {
				return nil, err
			}
			if req.Subnet.Masked() != req.Subnet {
				return nil, BadRequest("invalid subnet - bits after network prefix are not all zero: %v", req.Subnet)
			}
		}
		if err := checkID(req.ID); err != nil {
			return nil, err
		}
		got, err := b.Alloc(ctx, req.ID, req.Subnet)
		return AllocResponse{Address: got}, err
	}))
	mux.HandleFunc("POST /v1/ipam/claim", handle(s, func(ctx context.Context, req *ClaimRequest) (any, error) {
		err := checkCIDR(req.CIDR)
		if err == nil {
			err = checkID(req.ID)
		}
		if err != nil {
			return nil, err
		}
		got, err := b.Claim(ctx, req.ID, req.CIDR)
		return AllocResponse{Address: got}, err
	}))
	mux.HandleFunc("POST /v1/ipam/release", handle(s, func(ctx context.Context, req *ReleaseRequest) (any, error) {
		if err := checkID(req.ID); err != nil {
			return nil, err
		}
		if req.Address.IsValid() && !req.Address.Is4() {
			return nil, BadRequest("%v is not an IPv4 address", req.Address)
		}
		return nil, b.Release(ctx, req.ID, req.Address)
	}))
	mux.HandleFunc("POST /v1/ipam/rmpeer", handle(s, func(ctx context.Context, req *RmPeerRequest) (any, error) {
		if req.Peer == "" {
			return nil, BadRequest("a peer name is required (like 12:d2:fe:7a:c1:f2)")
		}
		return b.RmPeer(ctx, req.Peer)
	}))
	mux.HandleFunc("GET /v1/ipam/ring", func(w http.ResponseWriter, r *http.Request) {
		st, err := b.Ring(r.Context())
		s.reply(w, st, err)
	})
	mux.HandleFunc("GET /v1/dns", func(w http.ResponseWriter, r *http.Request) {
		st, err := b.DNS(r.Context())
		s.reply(w, st, err)
	})
	mux.HandleFunc("POST /v1/dns/add", handle(s, func(ctx context.Context, req *DNSRequest) (any, error) {
		if req.Name == "" || len(req.Addresses) == 0 {
			return nil, BadRequest("a name and at least one address are required")
		}
		if err := checkDNSRequest(req); err != nil {
			return nil, err
		}
		return b.DNSAdd(ctx, *req)
	}))
	mux.HandleFunc("POST /v1/dns/remove", handle(s, func(ctx context.Context, req *DNSRequest) (any, error) {
		if req.Name == "" && len(req.Addresses) == 0 && req.ContainerID == "" {
			return nil, BadRequest("say what to remove: addresses, a name or a container ID")
		}
		if err := checkDNSRequest(req); err != nil {
			return nil, err
		}
		return b.DNSRemove(ctx, *req)
	}))
	mux.HandleFunc("POST /v1/dns/lookup", handle(s, func(ctx context.Context, req *LookupRequest) (any, error) {
		if req.Name == "" {
			return nil, BadRequest("a name is required")
		}
		return b.DNSLookup(ctx, req.Name)
	}))
	mux.HandleFunc("POST /v1/attach", handle(s, func(ctx context.Context, req *AttachRequest) (any, error) {
		if err := checkAttach(req); err != nil {
			return nil, err
		}
		return b.Attach(ctx, *req)
	}))
	mux.HandleFunc("POST /v1/detach", handle(s, func(ctx context.Context, req *AttachRequest) (any, error) {
		if err := checkAttach(req); err != nil {
			return nil, err
		}
		return nil, b.Detach(ctx, *req)
	}))
	mux.HandleFunc("GET /v1/ps", func(w http.ResponseWriter, r *http.Request) {
		ps, err := b.Ps(r.Context())
		s.reply(w, ps, err)
	})
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: zap.NewStdLog(log.WithOptions(zap.IncreaseLevel(zap.WarnLevel)))}
	return s, nil
}

// MaxIDLen bounds an allocation ID (a container ID is 64 bytes).
const MaxIDLen = 255

// checkID refuses an empty, over-long or unprintable allocation ID.
func checkID(id string) error {
	if id == "" || len(id) > MaxIDLen {
		return BadRequest("an ID of 1 to %d bytes is required", MaxIDLen)
	}
	for _, r := range id {
		if r < 0x21 || r == 0x7f || r == utf8.RuneError {
			return BadRequest("ID %q has a space or a control character", id)
		}
	}
	return nil
}

// checkDNSRequest checks the addresses and the container ID.
func checkDNSRequest(req *DNSRequest) error {
	if len(req.Addresses) > 1024 {
		return BadRequest("%d addresses in one request (at most 1024)", len(req.Addresses))
	}
	for _, a := range req.Addresses {
		if !a.Is4() {
			return BadRequest("%v is not an IPv4 address", a)
		}
	}
	if req.ContainerID != "" {
		return checkID(req.ContainerID)
	}
	return nil
}

// checkAttach checks the target and the CIDRs.
func checkAttach(req *AttachRequest) error {
	if req.Target == "" || len(req.Target) > 4096 || strings.ContainsRune(req.Target, 0) {
		return BadRequest("a target is required: a network namespace name or path")
	}
	if len(req.CIDRs) > 64 {
		return BadRequest("%d addresses for one container (at most 64)", len(req.CIDRs))
	}
	for _, c := range req.CIDRs {
		if err := checkCIDR(c); err != nil {
			return err
		}
	}
	return nil
}

// checkCIDR refuses a missing or non-IPv4 address with prefix length.
func checkCIDR(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return BadRequest("a CIDR is required (e.g. 10.32.0.1/12)")
	case !p.Addr().Is4():
		return BadRequest("%v is not IPv4", p)
	}
	return nil
}

// ParseCIDR parses an IPv4 address with prefix length, like 10.32.0.1/24,
// where a request is made (the command line); its errors are
// RequestErrors.
func ParseCIDR(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, BadRequest("a CIDR is required (e.g. 10.32.0.1/12)")
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, BadRequest("%q is not an address with a prefix length (e.g. 10.32.0.1/12)", s)
	}
	return p, checkCIDR(p)
}

// Run serves until ctx ends, then shuts down and removes the socket.
func (s *Server) Run(ctx context.Context) error {
	err := serve.Run(ctx, s.http, s.ln)
	serve.RemoveSocket(s.path)
	return err
}

// Close releases the socket when Run was never called.
func (s *Server) Close() {
	s.ln.Close()
	serve.RemoveSocket(s.path)
}

// handle decodes a JSON body into a Req, calls do, and replies with what
// it returns (nothing: 204).
func handle[Req any](s *Server, do func(context.Context, *Req) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := decode(r, &req); err != nil {
			s.reply(w, nil, err)
			return
		}
		v, err := do(r.Context(), &req)
		s.reply(w, v, err)
	}
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return BadRequest("request body: %v", err)
	}
	// One JSON value and nothing after it: a body with more is not a
	// request this server understands, whatever came first.
	if _, err := dec.Token(); err != io.EOF {
		return BadRequest("request body: more after the JSON value")
	}
	return nil
}

func (s *Server) reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case IsBadRequest(err):
			code = http.StatusBadRequest
		case errors.Is(err, context.Canceled):
			code = http.StatusServiceUnavailable
		}
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(ErrorResponse{Error: err.Error()})
		return
	}
	if v == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}
