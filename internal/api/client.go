package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"syscall"
)

// Client talks to overlayd's control socket.
type Client struct {
	path string
	http *http.Client
}

// NewClient makes a client for the socket at path. It connects lazily.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConnsPerHost: 4,
	}
	return &Client{path: path, http: &http.Client{Transport: tr}} // callers bound calls with their context
}

// Close drops the idle connection kept for the next call.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// Status fetches the daemon's state.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.call(ctx, http.MethodGet, "/v1/status", nil, &st)
}

// Version fetches the daemon's version.
func (c *Client) Version(ctx context.Context) (VersionInfo, error) {
	var v VersionInfo
	return v, c.call(ctx, http.MethodGet, "/v1/version", nil, &v)
}

// Connect adds targets.
func (c *Client) Connect(ctx context.Context, peers []string) error {
	return c.call(ctx, http.MethodPost, "/v1/connect", PeersRequest{Peers: peers}, nil)
}

// Forget removes targets.
func (c *Client) Forget(ctx context.Context, peers []string) error {
	return c.call(ctx, http.MethodPost, "/v1/forget", PeersRequest{Peers: peers}, nil)
}

// Expose gives this host an overlay address (one from IPAM if cidr is
// the zero Prefix) and returns it.
func (c *Client) Expose(ctx context.Context, cidr netip.Prefix) (netip.Prefix, error) {
	var r AllocResponse
	return r.Address, c.call(ctx, http.MethodPost, "/v1/expose", CIDRRequest{CIDR: cidr}, &r)
}

// Alloc asks for an address for id, in subnet (none: the default subnet).
func (c *Client) Alloc(ctx context.Context, id string, subnet netip.Prefix) (netip.Prefix, error) {
	var r AllocResponse
	return r.Address, c.call(ctx, http.MethodPost, "/v1/ipam/alloc", AllocRequest{ID: id, Subnet: subnet}, &r)
}

// Claim asks for the address cidr for id.
func (c *Client) Claim(ctx context.Context, id string, cidr netip.Prefix) (netip.Prefix, error) {
	var r AllocResponse
	return r.Address, c.call(ctx, http.MethodPost, "/v1/ipam/claim", ClaimRequest{ID: id, CIDR: cidr}, &r)
}

// Release frees id's addresses, or only addr if it is valid.
func (c *Client) Release(ctx context.Context, id string, addr netip.Addr) error {
	return c.call(ctx, http.MethodPost, "/v1/ipam/release", ReleaseRequest{ID: id, Address: addr}, nil)
}

// RmPeer takes over a dead peer's space.
func (c *Client) RmPeer(ctx context.Context, peer string) (RmPeerResponse, error) {
	var r RmPeerResponse
	return r, c.call(ctx, http.MethodPost, "/v1/ipam/rmpeer", RmPeerRequest{Peer: peer}, &r)
}

// Ring waits for the ring to exist (starting consensus if needed) and
// returns the allocator's state.
func (c *Client) Ring(ctx context.Context) (IPAMStatus, error) {
	var st IPAMStatus
	return st, c.call(ctx, http.MethodGet, "/v1/ipam/ring", nil, &st)
}

// Hide removes an overlay address from this host.
func (c *Client) Hide(ctx context.Context, cidr netip.Prefix) error {
	return c.call(ctx, http.MethodPost, "/v1/hide", CIDRRequest{CIDR: cidr}, nil)
}

// DNS returns the name server's state.
func (c *Client) DNS(ctx context.Context) (DNSStatus, error) {
	var st DNSStatus
	err := c.call(ctx, http.MethodGet, "/v1/dns", nil, &st)
	return st, err
}

// DNSAdd registers a name.
func (c *Client) DNSAdd(ctx context.Context, req DNSRequest) (DNSResponse, error) {
	var out DNSResponse
	err := c.call(ctx, http.MethodPost, "/v1/dns/add", req, &out)
	return out, err
}

// DNSRemove removes names.
func (c *Client) DNSRemove(ctx context.Context, req DNSRequest) (DNSResponse, error) {
	var out DNSResponse
	err := c.call(ctx, http.MethodPost, "/v1/dns/remove", req, &out)
	return out, err
}

// DNSLookup returns the addresses of a name.
func (c *Client) DNSLookup(ctx context.Context, name string) (LookupResponse, error) {
	var out LookupResponse
	err := c.call(ctx, http.MethodPost, "/v1/dns/lookup", LookupRequest{Name: name}, &out)
	return out, err
}

// Attach plumbs a container into the overlay.
func (c *Client) Attach(ctx context.Context, req AttachRequest) (Attachment, error) {
	var out Attachment
	err := c.call(ctx, http.MethodPost, "/v1/attach", req, &out)
	return out, err
}

// Detach takes a container out of the overlay.
func (c *Client) Detach(ctx context.Context, req AttachRequest) error {
	return c.call(ctx, http.MethodPost, "/v1/detach", req, nil)
}

// Ps lists the exposed addresses and attached containers.
func (c *Client) Ps(ctx context.Context) (PsResponse, error) {
	var out PsResponse
	err := c.call(ctx, http.MethodGet, "/v1/ps", nil, &out)
	return out, err
}

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://overlayd"+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		switch {
		case errors.Is(err, syscall.ENOENT):
			return fmt.Errorf("cannot reach overlayd: no socket at %s (is overlayd running? set --socket or %s)", c.path, SocketEnv)
		case errors.Is(err, syscall.ECONNREFUSED):
			return fmt.Errorf("cannot reach overlayd at %s: connection refused (is overlayd running?)", c.path)
		case errors.Is(err, syscall.EACCES):
			return fmt.Errorf("cannot reach overlayd at %s: permission denied (run as root)", c.path)
		}
		return fmt.Errorf("cannot reach overlayd at %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("reading the answer of overlayd: %w", err)
	}
	if resp.StatusCode >= 300 {
		var e ErrorResponse
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			e.Error = "overlayd answered " + resp.Status
		}
		return &StatusError{Code: resp.StatusCode, Message: e.Error}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("decoding the answer of overlayd: %w", err)
		}
	}
	return nil
}
