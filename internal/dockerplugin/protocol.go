// Package dockerplugin speaks Docker's remote plugin protocol (libnetwork's
// remote network driver and remote IPAM driver, "docker.plugins.v1"): JSON
// requests POSTed to /Plugin.Activate, /NetworkDriver.* and /IpamDriver.*
// on a unix socket under /run/docker/plugins, answered with JSON, errors
// as {"Err": "..."} with a non-200 status.
//
// It decodes and checks requests and encodes answers; what a request does
// is the Backend's business. There is no released Go module for this
// protocol (docker/go-plugins-helpers has never tagged a version), and the
// protocol is a dozen small structs.
package dockerplugin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
)

// MediaType is the content type of the protocol's answers.
const MediaType = "application/vnd.docker.plugins.v1+json"

// Error is an error answered with a status of its own: 400 for a request
// that is not acceptable as it is, 404 for a network, endpoint, pool or
// address the backend does not know. Its text is Err's.
type Error struct {
	Status int
	Err    error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// BadRequest makes an Error with status 400.
func BadRequest(format string, a ...any) error {
	return &Error{Status: http.StatusBadRequest, Err: fmt.Errorf(format, a...)}
}

// NotFound makes an Error with status 404.
func NotFound(format string, a ...any) error {
	return &Error{Status: http.StatusNotFound, Err: fmt.Errorf(format, a...)}
}

// status is the HTTP status err is answered with.
func status(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.Status
	}
	return http.StatusInternalServerError
}

// IPAMData is one address pool of a network, as the IPAM driver gave it.
type IPAMData struct {
	AddressSpace string
	Pool         string            // CIDR
	Gateway      string            // CIDR
	AuxAddresses map[string]string `json:",omitempty"`
}

// CreateNetworkRequest is /NetworkDriver.CreateNetwork.
type CreateNetworkRequest struct {
	NetworkID string
	Options   map[string]any
	IPv4Data  []IPAMData
	IPv6Data  []IPAMData
}

// EndpointInterface is an endpoint's addresses.
type EndpointInterface struct {
	Address     string `json:",omitempty"` // CIDR, from the IPAM driver
	AddressIPv6 string `json:",omitempty"`
	MacAddress  string `json:",omitempty"`
}

// CreateEndpointRequest is /NetworkDriver.CreateEndpoint.
type CreateEndpointRequest struct {
	NetworkID  string
	EndpointID string
	Interface  *EndpointInterface
	Options    map[string]any
}

// CreateEndpointResponse carries what the driver chose: only fields the
// request left empty (Docker refuses an answer that changes a given one).
type CreateEndpointResponse struct {
	Interface *EndpointInterface `json:",omitempty"`
}

// JoinRequest is /NetworkDriver.Join: the endpoint goes into a sandbox
// (the container's network namespace, at SandboxKey).
type JoinRequest struct {
	NetworkID  string
	EndpointID string
	SandboxKey string
	Options    map[string]any
}

// InterfaceName tells Docker which interface to move into the sandbox
// (SrcName) and how to name it there (DstPrefix plus a number).
type InterfaceName struct {
	SrcName   string
	DstPrefix string
}

// Route types of StaticRoute.
const (
	RouteNextHop   = 0
	RouteConnected = 1
)

// StaticRoute is a route Docker adds in the sandbox.
type StaticRoute struct {
	Destination string // CIDR
	RouteType   int
	NextHop     string `json:",omitempty"`
}

// JoinResponse is the answer to Join. No Gateway: Docker then gives the
// container its gateway bridge for outside traffic.
type JoinResponse struct {
	InterfaceName         InterfaceName
	Gateway               string        `json:",omitempty"`
	StaticRoutes          []StaticRoute `json:",omitempty"`
	DisableGatewayService bool
}

// RequestPoolRequest is /IpamDriver.RequestPool.
type RequestPoolRequest struct {
	AddressSpace string
	Pool         string // CIDR, or empty for the default
	SubPool      string
	Options      map[string]string
	V6           bool
}

// RequestPoolResponse is the answer to RequestPool.
type RequestPoolResponse struct {
	PoolID string
	Pool   string // CIDR
	Data   map[string]string
}

// RequestAddressRequest is /IpamDriver.RequestAddress.
type RequestAddressRequest struct {
	PoolID  string
	Address string // a wanted address, or empty
	Options map[string]string
}

// RequestAddressType is the Options key Docker sets to GatewayRequest when
// it asks for a network's gateway address.
const (
	RequestAddressType = "RequestAddressType"
	GatewayRequest     = "com.docker.network.gateway"
)

// RequestAddressResponse is the answer to RequestAddress.
type RequestAddressResponse struct {
	Address string // CIDR
	Data    map[string]string
}

// AddressSpaces is the answer to /IpamDriver.GetDefaultAddressSpaces.
type AddressSpaces struct {
	LocalDefaultAddressSpace  string
	GlobalDefaultAddressSpace string
}

// Backend does what the requests ask. An *Error (errors.As) is answered
// with its status, any other error with 500; the error's text is Docker's
// error message.
type Backend interface {
	CreateNetwork(ctx context.Context, req CreateNetworkRequest) error
	DeleteNetwork(ctx context.Context, networkID string) error
	CreateEndpoint(ctx context.Context, req CreateEndpointRequest) (CreateEndpointResponse, error)
	DeleteEndpoint(ctx context.Context, networkID, endpointID string) error
	EndpointInfo(ctx context.Context, networkID, endpointID string) (map[string]any, error)
	Join(ctx context.Context, req JoinRequest) (JoinResponse, error)
	Leave(ctx context.Context, networkID, endpointID string) error

	AddressSpaces() AddressSpaces
	RequestPool(ctx context.Context, req RequestPoolRequest) (RequestPoolResponse, error)
	ReleasePool(ctx context.Context, poolID string) error
	RequestAddress(ctx context.Context, req RequestAddressRequest) (RequestAddressResponse, error)
	ReleaseAddress(ctx context.Context, poolID, address string) error
}
