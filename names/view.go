package names

import (
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/overlayd/overlayd/proto"
)

// View is an immutable snapshot of the store's live entries for lookups:
// the resolver loads one per query. The zero View is empty. It holds no
// tombstones (Store.Entries lists those), so that making one after each
// change costs what the live entries do, however many deletions the store
// remembers.
type View struct {
	domain  string
	byName  map[string][]netip.Addr // lower-case FQDN: distinct addresses of live entries
	byAddr  map[netip.Addr]string   // the hostname of the first live entry, in entry order
	entries []proto.NameEntry       // the live entries, in entry order
	local   int                     // live entries of our origin
}

// buildView makes a View of the store's live entries.
func (s *Store) buildView() *View {
	v := &View{domain: s.cfg.Domain, byName: map[string][]netip.Addr{}, byAddr: map[netip.Addr]string{}}
	var keys []key
	for _, o := range s.origins {
		for k, r := range o.entries {
			if !r.Tombstone {
				keys = append(keys, k)
			}
		}
	}
	slices.SortFunc(keys, key.compare)
	v.entries = make([]proto.NameEntry, len(keys))
	for i, k := range keys {
		r := s.get(k)
		v.entries[i] = s.outgoing(r)
		if k.origin == s.cfg.Self {
			v.local++
		}
		if as := v.byName[k.name]; !slices.Contains(as, k.addr) {
			v.byName[k.name] = append(as, k.addr)
		}
		if _, ok := v.byAddr[k.addr]; !ok {
			v.byAddr[k.addr] = r.Hostname
		}
	}
	return v
}

// Entries lists every entry held, tombstones included, in entry order
// (see View.Entries): for reports, not for every change.
func (s *Store) Entries() []proto.NameEntry {
	var keys []key
	for _, o := range s.origins {
		keys = slices.AppendSeq(keys, maps.Keys(o.entries))
	}
	slices.SortFunc(keys, key.compare)
	es := make([]proto.NameEntry, len(keys))
	for i, k := range keys {
		es[i] = s.outgoing(s.get(k))
	}
	return es
}

// Domain is the served domain, lower case with its trailing dot.
func (v *View) Domain() string { return v.domain }

// Lookup returns the addresses of the live entries of an FQDN (any case),
// or nil. The slice is shared: do not change it.
func (v *View) Lookup(fqdn string) []netip.Addr {
	if as, ok := v.byName[fqdn]; ok {
		return as
	}
	return v.byName[strings.ToLower(fqdn)]
}

// Reverse returns the hostname of the first live entry with addr.
func (v *View) Reverse(addr netip.Addr) (string, bool) {
	h, ok := v.byAddr[addr]
	return h, ok
}

// Entries lists the live entries, sorted by hostname (case-insensitively),
// origin, container ID and address. The slice is shared: do not change
// it.
func (v *View) Entries() []proto.NameEntry { return v.entries }

// Live counts the live entries, and those of this peer.
func (v *View) Live() (all, local int) { return len(v.entries), v.local }
