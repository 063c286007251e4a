// Package containers is the table of the containers attached to the
// overlay on this host: what each one has (its namespace, host veth,
// addresses and name), which ones went away and since when, and when a
// container gone for longer than the grace period loses its addresses.
//
// A Table is a pure, tick-driven state machine, like the other cores: no
// netlink, files, clocks or goroutines. Its shell (package daemon) plumbs
// veths, follows the kernel's link deletions and Docker's events, and
// feeds them in:
//
//   - Put and Remove record what the shell plumbed or unplumbed;
//   - Gone (the kernel deleted a host veth), Died (Docker said the
//     container died) and Observe (which host veths exist now, checked
//     once a tick) tell it of containers going away or coming back;
//   - Tick advances time by one tick.
//
// Ready then holds the encoded table to save (attached.json) and the
// containers whose grace period ended: the shell removes their veth and
// resolv.conf and releases their addresses, and Removes each one it
// released; one it could not release stays, and is due again at the next
// Tick. A Table is not safe for concurrent use.
package containers

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Attachment is one container plumbed into the overlay.
type Attachment struct {
	ID        string         `json:"id"` // the container ID used for IPAM and DNS
	NetNS     string         `json:"netns"`
	HostIface string         `json:"hostIface"` // always HostIface(ID)
	MAC       string         `json:"mac"`
	Addresses []netip.Prefix `json:"addresses"`
	Name      string         `json:"name,omitempty"`
	// Lost lists addresses the container was given and that the
	// allocator gave up after a partition (another peer holds them now):
	// they were taken off the container.
	Lost []netip.Prefix `json:"lost,omitempty"`
}

func (a Attachment) clone() Attachment {
	a.Addresses = slices.Clone(a.Addresses)
	a.Lost = slices.Clone(a.Lost)
	return a
}

// HostIface is the host end's name for a container ID: "vethwe" and 9 hex
// digits of its hash, within the 15 bytes Linux allows.
func HostIface(id string) string {
	h := sha256.Sum256([]byte(id))
	return "vethwe" + hex.EncodeToString(h[:])[:9]
}

// Config configures a Table.
type Config struct {
	// GraceTicks is how many whole ticks a container that went away keeps
	// its addresses: it is released at the first Tick more than
	// GraceTicks ticks after it was noticed gone (0: the next Tick).
	GraceTicks int
	// Logf, if set, is told of containers going and coming back.
	Logf func(format string, a ...any)
}

// Ready is the work to do since the last Advance.
type Ready struct {
	// Released are containers whose grace period ended: remove their
	// veth and resolv.conf, release their addresses and names, and then
	// Remove them from the table.
	Released []Attachment
	// State is the table encoded (attached.json) when it changed; nil if
	// not. It must be saved after Released is carried out, so that a
	// crash in between releases them again rather than leaks them.
	State []byte
}

// Empty reports whether there is nothing to do.
func (rd Ready) Empty() bool { return len(rd.Released) == 0 && rd.State == nil }

// A Table holds the attached containers.
type Table struct {
	cfg   Config
	byID  map[string]*Attachment
	ticks int64
	// gone maps a container that went away to the tick it was noticed
	// at; dead marks those Docker said died, which stay gone even while
	// the kernel has not yet freed their namespace and veth.
	gone map[string]int64
	dead map[string]bool

	released []Attachment
	changed  bool
}

// New makes a Table from a saved one (nil: empty). A saved table that does
// not decode is an error and nothing is made.
func New(cfg Config, state []byte) (*Table, error) {
	if cfg.GraceTicks < 0 {
		return nil, fmt.Errorf("containers: GraceTicks %d is negative", cfg.GraceTicks)
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	t := &Table{cfg: cfg, byID: map[string]*Attachment{}, gone: map[string]int64{}, dead: map[string]bool{}}
	if state != nil {
		list, err := ParseState(state)
		if err != nil {
			return nil, err
		}
		for _, a := range list {
			t.byID[a.ID] = &a
		}
	}
	return t, nil
}

// Get returns a container by ID.
func (t *Table) Get(id string) (Attachment, bool) {
	a, ok := t.byID[id]
	if !ok {
		return Attachment{}, false
	}
	return a.clone(), true
}

// List returns every container, by ID.
func (t *Table) List() []Attachment {
	out := make([]Attachment, 0, len(t.byID))
	for _, id := range slices.Sorted(maps.Keys(t.byID)) {
		out = append(out, t.byID[id].clone())
	}
	return out
}

// Find finds a container by the target it was attached under: its ID,
// its name, or a prefix of its ID of 12 characters or more (a short
// Docker ID). An exact ID wins; otherwise it returns every match, by ID,
// and the caller must refuse more than one.
func (t *Table) Find(target string) []string {
	if _, ok := t.byID[target]; ok {
		return []string{target}
	}
	var found []string
	for _, id := range slices.Sorted(maps.Keys(t.byID)) {
		a := t.byID[id]
		if a.Name != "" && a.Name == target || len(target) >= 12 && strings.HasPrefix(id, target) {
			found = append(found, id)
		}
	}
	return found
}

// Put records a container the shell plumbed: a new one, or more
// addresses or a name for one already here. It is no longer gone.
func (t *Table) Put(a Attachment) {
	a = a.clone()
	a.HostIface = HostIface(a.ID)
	if old, ok := t.byID[a.ID]; !ok || !equal(*old, a) {
		t.changed = true
	}
	t.byID[a.ID] = &a
	if _, ok := t.gone[a.ID]; ok {
		t.cfg.Logf("container %s is back: it keeps its addresses", a.ID)
	}
	delete(t.gone, a.ID)
	delete(t.dead, a.ID)
}

// Remove forgets a container the shell detached (addrs nil), or only some
// of its addresses.
func (t *Table) Remove(id string, addrs []netip.Prefix) {
	a, ok := t.byID[id]
	if !ok {
		return
	}
	t.changed = true
	if addrs == nil {
		delete(t.byID, id)
		delete(t.gone, id)
		delete(t.dead, id)
		t.released = slices.DeleteFunc(t.released, func(a Attachment) bool { return a.ID == id })
		return
	}
	a.Addresses = slices.DeleteFunc(a.Addresses, func(p netip.Prefix) bool { return slices.Contains(addrs, p) })
}

// Lose moves address p of container id from its Addresses to its Lost (see
// Attachment.Lost) and returns the container as it is now; false if the
// container does not have p.
func (t *Table) Lose(id string, p netip.Prefix) (Attachment, bool) {
	a, ok := t.byID[id]
	if !ok {
		return Attachment{}, false
	}
	i := slices.IndexFunc(a.Addresses, func(q netip.Prefix) bool { return q.Addr() == p.Addr() })
	if i < 0 {
		return Attachment{}, false
	}
	a.Lost = slices.DeleteFunc(a.Lost, func(q netip.Prefix) bool { return q.Addr() == p.Addr() })
	if len(a.Lost) == MaxAddrs {
		a.Lost = slices.Delete(a.Lost, 0, 1)
	}
	a.Lost = append(a.Lost, a.Addresses[i])
	a.Addresses = slices.Delete(a.Addresses, i, i+1)
	t.changed = true
	return a.clone(), true
}

// Gone tells the Table that the kernel deleted host veth iface: its
// container's grace period starts.
func (t *Table) Gone(iface string) {
	for _, id := range slices.Sorted(maps.Keys(t.byID)) {
		if t.byID[id].HostIface == iface {
			t.markGone(id)
		}
	}
}

// Died tells the Table that Docker container id died: it is gone, even
// while its veth lingers (the kernel frees namespaces lazily).
func (t *Table) Died(id string) {
	if _, ok := t.byID[id]; ok {
		t.dead[id] = true
		t.markGone(id)
	}
}

// Observe tells the Table which host veths exist now (present[iface]):
// a container whose veth is missing is gone; one whose veth is there and
// that Docker did not say died is not.
func (t *Table) Observe(present map[string]bool) {
	for _, id := range slices.Sorted(maps.Keys(t.byID)) {
		if present[t.byID[id].HostIface] && !t.dead[id] {
			if _, ok := t.gone[id]; ok {
				t.cfg.Logf("container %s is back: it keeps its addresses", id)
				delete(t.gone, id)
			}
			continue
		}
		t.markGone(id)
	}
}

func (t *Table) markGone(id string) {
	if _, ok := t.gone[id]; ok {
		return
	}
	t.gone[id] = t.ticks
	t.cfg.Logf("container %s gone; its addresses are kept for the grace period", id)
}

// Hosts lists the host veths of the containers, for Observe.
func (t *Table) Hosts() []string {
	var out []string
	for _, id := range slices.Sorted(maps.Keys(t.byID)) {
		out = append(out, t.byID[id].HostIface)
	}
	return out
}

// Tick advances time by one tick; containers gone for longer than the
// grace period are due for release (Ready.Released) until Removed.
func (t *Table) Tick() {
	t.ticks++
	t.released = t.released[:0]
	for _, id := range slices.Sorted(maps.Keys(t.gone)) {
		if t.ticks-t.gone[id] > int64(t.cfg.GraceTicks) {
			t.released = append(t.released, t.byID[id].clone())
		}
	}
}

// Ticks is the Table's time.
func (t *Table) Ticks() int64 { return t.ticks }

// Ready returns the work to do; the same until Advance.
func (t *Table) Ready() Ready {
	rd := Ready{Released: slices.Clone(t.released)}
	if t.changed {
		b, err := EncodeState(t.List())
		if err != nil {
			t.cfg.Logf("the table is not saved: %v", err)
		}
		rd.State = b
	}
	return rd
}

// Advance tells the Table that the last Ready was carried out: the state
// was saved, and the containers released were Removed (those that were
// not are due again at the next Tick).
func (t *Table) Advance() {
	t.released, t.changed = nil, false
}

func equal(a, b Attachment) bool {
	return a.ID == b.ID && a.NetNS == b.NetNS && a.HostIface == b.HostIface && a.MAC == b.MAC && a.Name == b.Name &&
		slices.Equal(a.Addresses, b.Addresses) && slices.Equal(a.Lost, b.Lost)
}
