package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
// replaced; a live one is an error.
func Listen(path string, b Backend, version string, log *zap.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("api: creating the socket directory: %w", err)
	}
	if _, err := os.Lstat(path); err == nil {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("api: another overlayd is listening on %s", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("api: removing stale socket: %w", err)
		}
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
		var p netip.Prefix
		if req.CIDR != "" {
			var err error
			if p, err = ParseCIDR(req.CIDR); err != nil {
				return nil, err
			}
		}
		got, err := b.Expose(ctx, p)
		return AllocResponse{Address: got}, err
	}))
	mux.HandleFunc("POST /v1/hide", handle(s, func(ctx context.Context, req *CIDRRequest) (any, error) {
		p, err := ParseCIDR(req.CIDR)
		if err != nil {
			return nil, err
		}
		return nil, b.Hide(ctx, p)
	}))
	mux.HandleFunc("POST /v1/ipam/alloc", handle(s, func(ctx context.Context, req *AllocRequest) (any, error) {
		var sub netip.Prefix
		if req.Subnet != "" {
			var err error
			if sub, err = ParseCIDR(req.Subnet); err != nil {
				return nil, err
			}
			if sub.Masked() != sub {
				return nil, fmt.Errorf("%w: invalid subnet - bits after network prefix are not all zero: %v", ErrBadRequest, sub)
			}
		}
		if err := checkID(req.ID); err != nil {
			return nil, err
		}
		got, err := b.Alloc(ctx, req.ID, sub)
		return AllocResponse{Address: got}, err
	}))
	mux.HandleFunc("POST /v1/ipam/claim", handle(s, func(ctx context.Context, req *ClaimRequest) (any, error) {
		p, err := ParseCIDR(req.CIDR)
		if err == nil {
			err = checkID(req.ID)
		}
		if err != nil {
			return nil, err
		}
		got, err := b.Claim(ctx, req.ID, p)
		return AllocResponse{Address: got}, err
	}))
	mux.HandleFunc("POST /v1/ipam/release", handle(s, func(ctx context.Context, req *ReleaseRequest) (any, error) {
		if err := checkID(req.ID); err != nil {
			return nil, err
		}
		var a netip.Addr
		if req.Address != "" {
			var err error
			if a, err = netip.ParseAddr(strings.Split(req.Address, "/")[0]); err != nil || !a.Is4() {
				return nil, fmt.Errorf("%w: %q is not an IPv4 address", ErrBadRequest, req.Address)
			}
		}
		return nil, b.Release(ctx, req.ID, a)
	}))
	mux.HandleFunc("POST /v1/ipam/rmpeer", handle(s, func(ctx context.Context, req *RmPeerRequest) (any, error) {
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
			return nil, fmt.Errorf("%w: a name and at least one address are required", ErrBadRequest)
		}
		if err := checkDNSRequest(req); err != nil {
			return nil, err
		}
		return b.DNSAdd(ctx, *req)
	}))
	mux.HandleFunc("POST /v1/dns/remove", handle(s, func(ctx context.Context, req *DNSRequest) (any, error) {
		if req.Name == "" && len(req.Addresses) == 0 && req.ContainerID == "" {
			return nil, fmt.Errorf("%w: say what to remove: addresses, a name or a container ID", ErrBadRequest)
		}
		if err := checkDNSRequest(req); err != nil {
			return nil, err
		}
		return b.DNSRemove(ctx, *req)
	}))
	mux.HandleFunc("POST /v1/dns/lookup", handle(s, func(ctx context.Context, req *LookupRequest) (any, error) {
		if req.Name == "" {
			return nil, fmt.Errorf("%w: a name is required", ErrBadRequest)
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
		return fmt.Errorf("%w: an ID of 1 to %d bytes is required", ErrBadRequest, MaxIDLen)
	}
	for _, r := range id {
		if r < 0x21 || r == 0x7f || r == utf8.RuneError {
			return fmt.Errorf("%w: ID %q has a space or a control character", ErrBadRequest, id)
		}
	}
	return nil
}

// checkDNSRequest checks the addresses and the container ID.
func checkDNSRequest(req *DNSRequest) error {
	if len(req.Addresses) > 1024 {
		return fmt.Errorf("%w: %d addresses in one request (at most 1024)", ErrBadRequest, len(req.Addresses))
	}
	for _, a := range req.Addresses {
		ip, err := netip.ParseAddr(strings.Split(a, "/")[0])
		if err != nil || !ip.Is4() {
			return fmt.Errorf("%w: %q is not an IPv4 address", ErrBadRequest, a)
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
		return fmt.Errorf("%w: a target is required: a network namespace name or path", ErrBadRequest)
	}
	if len(req.CIDRs) > 64 {
		return fmt.Errorf("%w: %d addresses for one container (at most 64)", ErrBadRequest, len(req.CIDRs))
	}
	for _, c := range req.CIDRs {
		if _, err := ParseCIDR(c); err != nil {
			return err
		}
	}
	return nil
}

// ParseCIDR parses an IPv4 address with prefix length, like 10.32.0.1/24.
func ParseCIDR(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, fmt.Errorf("%w: a CIDR is required (e.g. 10.32.0.1/12)", ErrBadRequest)
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%w: %q is not an address with a prefix length (e.g. 10.32.0.1/12)", ErrBadRequest, s)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("%w: %v is not IPv4", ErrBadRequest, p)
	}
	return p, nil
}

// Run serves until ctx ends, then shuts down and removes the socket.
func (s *Server) Run(ctx context.Context) error {
	err := serve.Run(ctx, s.http, s.ln)
	os.Remove(s.path)
	return err
}

// Close releases the socket when Run was never called.
func (s *Server) Close() {
	s.ln.Close()
	os.Remove(s.path)
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
		return fmt.Errorf("%w: request body: %v", ErrBadRequest, err)
	}
	return nil
}

func (s *Server) reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrBadRequest), errors.Is(err, ErrIPAMOff), errors.Is(err, ErrDNSOff):
			code = http.StatusBadRequest
		case errors.Is(err, context.Canceled):
			code = http.StatusServiceUnavailable
		}
		msg := strings.TrimPrefix(err.Error(), ErrBadRequest.Error()+": ")
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(ErrorResponse{Error: msg})
		return
	}
	if v == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}
