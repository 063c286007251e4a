// Package pluginstate is the Docker plugin's saved state: the networks of
// its driver and their endpoints, kept as JSON across restarts (Docker
// does not tell a restarted plugin what it told it before).
package pluginstate

import (
	"encoding/json"
	"maps"
	"net/netip"
	"slices"
)

// Network is a Docker network of the driver.
type Network struct {
	ID   string       `json:"id"`
	Pool netip.Prefix `json:"pool"`
	// DockerIPAM: Docker's own IPAM chooses the addresses, and each is
	// claimed in overlayd's while its endpoint lives.
	DockerIPAM bool `json:"dockerIPAM,omitempty"`
}

// Endpoint is one container's interface on such a network.
type Endpoint struct {
	ID        string       `json:"id"`
	NetworkID string       `json:"networkID"`
	Address   netip.Prefix `json:"address"`
	HostIface string       `json:"hostIface"`
	Inner     string       `json:"inner"` // the container's end until Docker renames it
	MAC       string       `json:"mac"`
	Sandbox   string       `json:"sandbox,omitempty"`   // the container's namespace, once joined
	Left      bool         `json:"left,omitempty"`      // Docker took it out of its container
	Claimed   bool         `json:"claimed,omitempty"`   // its address, from Docker's IPAM, is claimed in ours
	Container string       `json:"container,omitempty"` // its ID, once Docker said
}

// State is the networks and endpoints, by ID.
type State struct {
	Networks  map[string]*Network
	Endpoints map[string]*Endpoint
}

// New is an empty state.
func New() *State {
	return &State{Networks: map[string]*Network{}, Endpoints: map[string]*Endpoint{}}
}

type file struct {
	Networks  []*Network  `json:"networks"`
	Endpoints []*Endpoint `json:"endpoints"`
}

// Decode reads a saved state. Entries without an ID, or with an address
// that is not IPv4, are dropped and counted; bytes that are not the
// state's JSON are an error.
func Decode(b []byte) (s *State, dropped int, err error) {
	var f file
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, 0, err
	}
	s = New()
	for _, n := range f.Networks {
		if n == nil || n.ID == "" || !n.Pool.IsValid() || !n.Pool.Addr().Is4() {
			dropped++
			continue
		}
		s.Networks[n.ID] = n
	}
	for _, e := range f.Endpoints {
		if e == nil || e.ID == "" || !e.Address.IsValid() || !e.Address.Addr().Is4() {
			dropped++
			continue
		}
		s.Endpoints[e.ID] = e
	}
	return s, dropped, nil
}

// Encode writes the state, sorted by ID.
func (s *State) Encode() ([]byte, error) {
	f := file{Networks: []*Network{}, Endpoints: []*Endpoint{}}
	for _, id := range slices.Sorted(maps.Keys(s.Networks)) {
		f.Networks = append(f.Networks, s.Networks[id])
	}
	for _, id := range slices.Sorted(maps.Keys(s.Endpoints)) {
		f.Endpoints = append(f.Endpoints, s.Endpoints[id])
	}
	return json.MarshalIndent(f, "", "  ")
}
