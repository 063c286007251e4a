// Package api is overlayd's control API: HTTP with JSON bodies on a unix
// socket that only root may open. The server side adapts HTTP to a Backend
// (the daemon); Client is what overlayctl uses.
//
// Endpoints (all bodies JSON):
//
//	GET  /v1/status   Status
//	GET  /v1/version  VersionInfo
//	POST /v1/connect  PeersRequest: add targets
//	POST /v1/forget   PeersRequest: remove targets
//	POST /v1/expose   CIDRRequest: give this host an overlay address
//	POST /v1/hide     CIDRRequest: take it away
//
// Errors come back with a 4xx or 5xx status and ErrorResponse.
package api

import (
	"context"
	"errors"
	"net/netip"

	"github.com/overlayd/overlayd/peering"
)

// DefaultSocket is where overlayd listens unless told otherwise.
const DefaultSocket = "/run/overlayd/overlayd.sock"

// SocketEnv names the environment variable overlayctl reads the socket from.
const SocketEnv = "OVERLAY_SOCKET"

// Backend is what the API serves. Methods may be called concurrently.
// Errors wrapping ErrBadRequest are the caller's fault and map to 400.
type Backend interface {
	Status(ctx context.Context) (Status, error)
	Connect(ctx context.Context, peers []string) error
	Forget(ctx context.Context, peers []string) error
	Expose(ctx context.Context, cidr netip.Prefix) error
	Hide(ctx context.Context, cidr netip.Prefix) error
}

// ErrBadRequest marks errors caused by the request.
var ErrBadRequest = errors.New("bad request")

// Status is the whole daemon state.
type Status struct {
	Version string         `json:"version"`
	Router  peering.Status `json:"router"`
	IPAM    IPAMStatus     `json:"ipam"`
}

// IPAMStatus is the allocator's section of Status.
type IPAMStatus struct {
	Enabled       bool         `json:"enabled"`
	Status        string       `json:"status"`
	Range         netip.Prefix `json:"range"`
	DefaultSubnet netip.Prefix `json:"defaultSubnet"`
}

// VersionInfo identifies the daemon.
type VersionInfo struct {
	Version            string `json:"version"`
	ProtocolMinVersion uint8  `json:"protocolMinVersion"`
	ProtocolMaxVersion uint8  `json:"protocolMaxVersion"`
}

// PeersRequest is the body of connect and forget.
type PeersRequest struct {
	Peers []string `json:"peers"`
}

// CIDRRequest is the body of expose and hide.
type CIDRRequest struct {
	CIDR string `json:"cidr"`
}

// ErrorResponse is the body of every failed request.
type ErrorResponse struct {
	Error string `json:"error"`
}
