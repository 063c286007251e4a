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
//	POST /v1/expose   CIDRRequest: give this host an overlay address (from IPAM if CIDR is empty)
//	POST /v1/hide     CIDRRequest: take it away
//	POST /v1/ipam/alloc    AllocRequest → AllocResponse: an address for an ID
//	POST /v1/ipam/claim    ClaimRequest → AllocResponse: a given address for an ID
//	POST /v1/ipam/release  ReleaseRequest: free an ID's addresses
//	POST /v1/ipam/rmpeer   RmPeerRequest → RmPeerResponse: take over a dead peer's space
//	GET  /v1/ipam/ring     IPAMStatus, once the ring exists (starts consensus if needed)
//	GET  /v1/dns           DNSStatus: domain, addresses, upstream servers, entries
//	POST /v1/dns/add       DNSRequest → DNSResponse: register a name for addresses
//	POST /v1/dns/remove    DNSRequest → DNSResponse: remove names of this peer
//	POST /v1/dns/lookup    LookupRequest → LookupResponse: the addresses of a name
//	POST /v1/attach        AttachRequest → Attachment: plumb a container into the overlay
//	POST /v1/detach        AttachRequest: take it out again (or only some addresses)
//	GET  /v1/ps            PsResponse: this host's exposed addresses and containers
//
// Errors come back with a 4xx or 5xx status and ErrorResponse.
//
// Addresses travel as netip values (JSON strings such as "10.32.0.1/12"),
// decoded once, where a request enters; the types here are the API's own,
// so that its clients need none of the daemon's packages.
package api

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/overlayd/overlayd/proto"
)

// DefaultSocket is where overlayd listens unless told otherwise.
const DefaultSocket = "/run/overlayd/overlayd.sock"

// SocketEnv names the environment variable overlayctl reads the socket from.
const SocketEnv = "OVERLAY_SOCKET"

// Backend is what the API serves. Methods may be called concurrently.
// A *RequestError (errors.As) is the caller's fault and maps to 400.
type Backend interface {
	Status(ctx context.Context) (Status, error)
	Connect(ctx context.Context, peers []string) error
	Forget(ctx context.Context, peers []string) error
	Expose(ctx context.Context, cidr netip.Prefix) (netip.Prefix, error) // invalid cidr: take one from IPAM
	Hide(ctx context.Context, cidr netip.Prefix) error
	Alloc(ctx context.Context, id string, subnet netip.Prefix) (netip.Prefix, error)
	Claim(ctx context.Context, id string, cidr netip.Prefix) (netip.Prefix, error)
	Release(ctx context.Context, id string, addr netip.Addr) error
	RmPeer(ctx context.Context, peer string) (RmPeerResponse, error)
	Ring(ctx context.Context) (IPAMStatus, error)
	DNS(ctx context.Context) (DNSStatus, error)
	DNSAdd(ctx context.Context, req DNSRequest) (DNSResponse, error)
	DNSRemove(ctx context.Context, req DNSRequest) (DNSResponse, error)
	DNSLookup(ctx context.Context, name string) (LookupResponse, error)
	Attach(ctx context.Context, req AttachRequest) (Attachment, error)
	Detach(ctx context.Context, req AttachRequest) error
	Ps(ctx context.Context) (PsResponse, error)
}

// AttachRequest names a container (a network namespace: its name under
// /run/netns, or a path), the addresses it gets (none: one from IPAM) and
// the name it is registered under in DNS.
type AttachRequest struct {
	Target string         `json:"target"`
	CIDRs  []netip.Prefix `json:"cidrs,omitempty"`
	Name   string         `json:"name,omitempty"`
}

// Attachment is a container plumbed into the overlay.
type Attachment struct {
	ID        string         `json:"id"` // the container ID used for IPAM and DNS
	NetNS     string         `json:"netns"`
	HostIface string         `json:"hostIface"`
	MAC       string         `json:"mac"`
	Addresses []netip.Prefix `json:"addresses"`
	Name      string         `json:"name,omitempty"`
	Lost      []netip.Prefix `json:"lost,omitempty"` // given up after a partition (IPAMLost), taken off the container
}

// PsResponse is `weave ps`: the host's exposed addresses, then each
// attached container.
type PsResponse struct {
	Peer       proto.PeerName `json:"peer"`
	Exposed    []netip.Prefix `json:"exposed"`
	Containers []Attachment   `json:"containers"`
}

// RequestError is an error of the request's, not of the daemon's: the
// server answers it with 400. Its text is Err's.
type RequestError struct{ Err error }

func (e *RequestError) Error() string { return e.Err.Error() }
func (e *RequestError) Unwrap() error { return e.Err }

// BadRequest makes a RequestError.
func BadRequest(format string, a ...any) error {
	return &RequestError{Err: fmt.Errorf(format, a...)}
}

// IsBadRequest reports whether err is, or wraps, a RequestError.
func IsBadRequest(err error) bool {
	var re *RequestError
	return errors.As(err, &re)
}

// ErrDNSOff is returned by the DNS calls of a daemon started with --no-dns.
var ErrDNSOff error = &RequestError{Err: errors.New("DNS is off: overlayd was started with --no-dns")}

// ErrIPAMOff is returned by the IPAM calls of a daemon without --range.
var ErrIPAMOff error = &RequestError{Err: errors.New("IPAM is off: overlayd was started without --range")}

// StatusError is what Client returns when the daemon refuses a request:
// the HTTP status and the daemon's message.
type StatusError struct {
	Code    int
	Message string
}

func (e *StatusError) Error() string { return e.Message }

// Status is the whole daemon state.
type Status struct {
	Version string       `json:"version"`
	Router  RouterStatus `json:"router"`
	IPAM    IPAMStatus   `json:"ipam"`
	DNS     DNSStatus    `json:"dns"`
	Plugin  PluginStatus `json:"plugin"`
}

// PluginStatus is the Docker plugin's section of Status.
type PluginStatus struct {
	Enabled    bool   `json:"enabled"`
	DriverName string `json:"driverName"` // of the network and the IPAM driver
	Socket     string `json:"socket"`
	Network    string `json:"network"` // created at start; "" for none
	Networks   int    `json:"networks"`
	Endpoints  int    `json:"endpoints"`
}

// DNSStatus is the name server's section of Status.
type DNSStatus struct {
	Enabled bool   `json:"enabled"`
	Domain  string `json:"domain"`
	Listen  string `json:"listen"` // host:port of the DNS server
	// Address is what containers are given as their DNS server (dns-args);
	// empty when the server listens on every address and none stands out.
	Address     string     `json:"address"`
	ResolvConf  string     `json:"resolvConf"`
	Upstream    []string   `json:"upstream"`
	TTL         uint32     `json:"ttl"`
	Live        int        `json:"live"`              // live entries, of every origin
	Local       int        `json:"local"`             // of those, registered here
	Entries     []DNSEntry `json:"entries,omitempty"` // in GET /v1/dns, not in Status
	Rejected    uint64     `json:"rejectedMessages"`
	Dropped     uint64     `json:"droppedMessages"`
	Queries     uint64     `json:"queries"` // answered here, forwarded or failed
	Forwarded   uint64     `json:"forwarded"`
	ServerFails uint64     `json:"serverFailures"`
	// Refused counts queries from clients the server does not answer
	// (not local, not in the range, not --dns-allow).
	Refused uint64 `json:"refusedClients"`
	// RateLimited counts queries over UDP beyond their client's rate
	// (--dns-rate-limit): not answered, or answered empty with TC set.
	RateLimited uint64 `json:"rateLimited"`
}

// DNSEntry is one registration, as Weave's report shows it.
type DNSEntry struct {
	Hostname    string         `json:"hostname"`
	Address     netip.Addr     `json:"address"`
	ContainerID string         `json:"containerID"`
	Origin      proto.PeerName `json:"origin"`
	Version     uint32         `json:"version"`
	Tombstone   bool           `json:"tombstone"`
}

// DNSRequest adds or removes names. Add needs Name and at least one
// address; remove needs at least one of them or ContainerID, and removes
// what matches all that are given.
type DNSRequest struct {
	Addresses   []netip.Addr `json:"addresses,omitempty"`
	Name        string       `json:"name,omitempty"`
	ContainerID string       `json:"containerID,omitempty"`
}

// DNSResponse lists the entries added or removed.
type DNSResponse struct {
	Entries []DNSEntry `json:"entries"`
}

// LookupRequest asks for the addresses of a name.
type LookupRequest struct {
	Name string `json:"name"`
}

// LookupResponse is the addresses of a name (its FQDN), sorted.
type LookupResponse struct {
	Name      string       `json:"name"`
	Addresses []netip.Addr `json:"addresses"`
}

// IPAMStatus is the allocator's section of Status.
type IPAMStatus struct {
	Enabled       bool             `json:"enabled"`
	Status        string           `json:"status"`
	Range         netip.Prefix     `json:"range"`
	RangeNumIPs   uint64           `json:"rangeNumIPs"`
	DefaultSubnet netip.Prefix     `json:"defaultSubnet"`
	Mode          string           `json:"mode"` // consensus, seed or observer
	Quorum        int              `json:"quorum,omitempty"`
	KnownVoters   int              `json:"knownVoters,omitempty"`
	Seeds         []proto.PeerName `json:"seeds"`
	ActiveIPs     int              `json:"activeIPs"` // allocated here, inside the range
	PendingAllocs int              `json:"pendingAllocates"`
	PendingClaims int              `json:"pendingClaims"`
	Owners        []IPAMOwner      `json:"owners"` // ourselves first
	Entries       []IPAMEntry      `json:"entries"`
	Owned         []IPAMAllocation `json:"owned"`
	Conflicts     uint64           `json:"conflicts"`  // our addresses a merge gave to another peer
	Duplicates    uint64           `json:"duplicates"` // of those, ones the other peer used too
	Donations     uint64           `json:"donations"`
	Rejected      uint64           `json:"rejectedMessages"`
	Dropped       uint64           `json:"droppedMessages"`
	Lost          []IPAMLost       `json:"lost"` // the last addresses given up, oldest first
}

// IPAMLost is an address given up here after a partition: two peers
// thought they owned its space (rmpeer of a peer that was only cut off),
// and the ring gave it to Owner. AllocatedThere says Owner had allocated
// it too; otherwise Owner did not answer and may have.
type IPAMLost struct {
	Address        netip.Prefix   `json:"address"`
	ID             string         `json:"id"`
	Owner          proto.PeerName `json:"owner"`
	Nickname       string         `json:"nickname,omitempty"`
	AllocatedThere bool           `json:"allocatedThere"`
}

// IPAMOwner is one peer's share of the range.
type IPAMOwner struct {
	Peer      proto.PeerName `json:"peer"`
	Nickname  string         `json:"nickname"`
	Size      uint64         `json:"size"`
	Reachable bool           `json:"reachable"`
	Self      bool           `json:"self"`
}

// IPAMEntry is one token of the ring.
type IPAMEntry struct {
	Token    netip.Addr     `json:"token"`
	Size     uint64         `json:"size"`
	Peer     proto.PeerName `json:"peer"`
	Nickname string         `json:"nickname"`
	Version  uint32         `json:"version"`
	Free     uint32         `json:"free"`
}

// IPAMAllocation is an address held here.
type IPAMAllocation struct {
	ID      string       `json:"id"`
	Address netip.Prefix `json:"address"`
	InRange bool         `json:"inRange"`
}

// AllocRequest asks for an address for ID, in Subnet (none: the default
// subnet).
type AllocRequest struct {
	ID     string       `json:"id"`
	Subnet netip.Prefix `json:"subnet,omitzero"`
}

// ClaimRequest asks for the address CIDR for ID.
type ClaimRequest struct {
	ID   string       `json:"id"`
	CIDR netip.Prefix `json:"cidr"`
}

// AllocResponse is the address given, with its prefix length.
type AllocResponse struct {
	Address netip.Prefix `json:"address"`
}

// ReleaseRequest frees ID's addresses, or only Address.
type ReleaseRequest struct {
	ID      string     `json:"id"`
	Address netip.Addr `json:"address,omitzero"`
}

// RmPeerRequest names a dead peer, by name (12:d2:fe:7a:c1:f2).
type RmPeerRequest struct {
	Peer string `json:"peer"`
}

// RmPeerResponse says how much space was taken over.
type RmPeerResponse struct {
	Peer  proto.PeerName `json:"peer"`
	Taken uint64         `json:"taken"`
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

// CIDRRequest is the body of expose (none: an address from IPAM) and hide.
type CIDRRequest struct {
	CIDR netip.Prefix `json:"cidr,omitzero"`
}

// ErrorResponse is the body of every failed request.
type ErrorResponse struct {
	Error string `json:"error"`
}

// WireGuardStatus sums up the WireGuard data plane.
type WireGuardStatus struct {
	Port      uint16 `json:"port"`
	PublicKey string `json:"publicKey"` // base64, as wg shows it
	Peers     int    `json:"peers"`
	Sessions  int    `json:"sessions"` // peers with a completed handshake
	RxBytes   uint64 `json:"rxBytes"`
	TxBytes   uint64 `json:"txBytes"`
}

// RouterStatus is the router's state.
type RouterStatus struct {
	Name               proto.PeerName `json:"name"`
	Nickname           string         `json:"nickname"`
	UID                uint64         `json:"uid"`
	Port               uint16         `json:"port"`
	ProtocolMinVersion uint8          `json:"protocolMinVersion"`
	ProtocolMaxVersion uint8          `json:"protocolMaxVersion"`
	// Encryption: password mode, peers authenticated and control traffic
	// sealed. DataEncryption: data packets are encrypted too.
	Encryption     bool `json:"encryption"`
	DataEncryption bool `json:"dataEncryption"`
	// TrustedSubnets are the underlay subnets whose peers may exchange
	// data with us in clear (password mode), if they trust us too.
	TrustedSubnets []netip.Prefix `json:"trustedSubnets"`
	// WireGuard is the data plane of password mode; nil without one.
	WireGuard     *WireGuardStatus `json:"wireguard,omitempty"`
	PeerDiscovery bool             `json:"peerDiscovery"`
	ConnLimit     int              `json:"connLimit"`
	MTU           int              `json:"mtu"`
	// UDPGSO says the socket sends runs of datagrams with UDP GSO, UDPGRO
	// that it receives them with UDP GRO.
	UDPGSO      bool           `json:"udpGSO"`
	UDPGRO      bool           `json:"udpGRO"`
	Targets     []string       `json:"targets"`
	Connections []Connection   `json:"connections"`
	Peers       []Peer         `json:"peers"`
	Routes      []Route        `json:"routes"`
	Exposed     []netip.Prefix `json:"exposed"`
	// GossipPartial is the number of chunked gossip messages waiting for
	// their missing chunks.
	GossipPartial int         `json:"gossipPartial"`
	Stats         RouterStats `json:"stats"`
	// PasswordRefused counts, in password mode, what was refused by reason.
	PasswordRefused map[string]uint64 `json:"passwordRefused,omitempty"`
	// RefusedAnnouncements counts prefixes peers announce in ring space
	// another peer owns, or wider than one address: left out of the
	// route table.
	RefusedAnnouncements int `json:"refusedAnnouncements"`
	// Unproven counts hellos, heartbeats and other datagrams the handshake
	// did not answer or take because their source address is not proven
	// (too short to answer, or without our accept's proof); Impostors,
	// gossip claiming another peer's name.
	Unproven  uint64 `json:"unproven"`
	Impostors uint64 `json:"impostors"`
}

// Connection is one line of `status connections`: a connection, or a
// target without one.
type Connection struct {
	Address  string         `json:"address"`
	Outbound bool           `json:"outbound"`
	State    string         `json:"state"` // connecting, retrying, failed, pending, established
	Info     string         `json:"info"`  // the error of a failed target
	RetryAt  *time.Time     `json:"retryAt,omitempty"`
	Name     proto.PeerName `json:"name,omitempty"`
	Nickname string         `json:"nickname,omitempty"`
	Overlay  string         `json:"overlay,omitempty"` // "udp": in clear, by the router; "wg": by WireGuard
	MTU      int            `json:"mtu,omitempty"`
}

// Peer is a peer the router knows, with the connections it has.
type Peer struct {
	Name        proto.PeerName   `json:"name"`
	Nickname    string           `json:"nickname"`
	UID         uint64           `json:"uid"`
	Connections []PeerConnection `json:"connections"`
}

// PeerConnection is one connection of a peer.
type PeerConnection struct {
	Name        proto.PeerName `json:"name"`
	Nickname    string         `json:"nickname"`
	Address     string         `json:"address"`
	Outbound    bool           `json:"outbound"`
	Established bool           `json:"established"`
}

// Route is one entry of the router's table.
type Route struct {
	Prefix  netip.Prefix   `json:"prefix"`
	Via     proto.PeerName `json:"via"`               // the peer that serves it
	NextHop proto.PeerName `json:"nextHop,omitempty"` // the relay, when not Via itself
	Local   bool           `json:"local,omitempty"`
}

// RouterStats are the router's counters.
type RouterStats struct {
	TunPackets      uint64 `json:"tunPackets"`
	SentPackets     uint64 `json:"sentPackets"`
	SentBytes       uint64 `json:"sentBytes"`
	ReceivedPackets uint64 `json:"receivedPackets"`
	ReceivedBytes   uint64 `json:"receivedBytes"`
	DropUnroutable  uint64 `json:"dropUnroutable"`
	DropSendError   uint64 `json:"dropSendError"`
	DropUnknownPeer uint64 `json:"dropUnknownPeer"`
	DropNotForUs    uint64 `json:"dropNotForUs"`
	DropMalformed   uint64 `json:"dropMalformed"`
	DropCtrlQueue   uint64 `json:"dropCtrlQueue"`  // of strangers (no established connection)
	DropPeerQueue   uint64 `json:"dropPeerQueue"`  // of established peers
	DropSourceRate  uint64 `json:"dropSourceRate"` // a stranger's beyond its address's rate
	DropPeerRate    uint64 `json:"dropPeerRate"`   // an established peer's beyond its rate
	DropTunWrite    uint64 `json:"dropTunWrite"`
	DropTunRead     uint64 `json:"dropTunRead"`
	DropHops        uint64 `json:"dropHops"`
	RelayedPackets  uint64 `json:"relayedPackets"`
	RelayedBytes    uint64 `json:"relayedBytes"`

	GossipSentBytes      uint64 `json:"gossipSentBytes"`
	GossipReceivedBytes  uint64 `json:"gossipReceivedBytes"`
	GossipRejected       uint64 `json:"gossipRejected"`
	GossipUnknownChannel uint64 `json:"gossipUnknownChannel"`
	GossipRelayed        uint64 `json:"gossipRelayed"`
	OtherSentBytes       uint64 `json:"otherGossipSentBytes"`
	OtherReceivedBytes   uint64 `json:"otherGossipReceivedBytes"`
	// DecodeErrors counts undecodable datagrams by type ("header" for a
	// bad header).
	DecodeErrors map[string]uint64 `json:"decodeErrors"`
}
