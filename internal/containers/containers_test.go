package containers

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

var seed = flag.Uint64("seed", 0, "run only this schedule seed")

func att(id string, addrs ...string) Attachment {
	a := Attachment{ID: id, NetNS: "/run/netns/" + id, MAC: "aa:bb:cc:dd:ee:ff"}
	for _, s := range addrs {
		a.Addresses = append(a.Addresses, netip.MustParsePrefix(s))
	}
	return a
}

func newTable(t *testing.T, grace int) *Table {
	t.Helper()
	tab, err := New(Config{GraceTicks: grace}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

// released ticks n times and returns the IDs released meanwhile (each
// Removed, as the shell does once it released it).
func released(tab *Table, n int) []string {
	var ids []string
	for range n {
		tab.Tick()
		for _, a := range tab.Ready().Released {
			ids = append(ids, a.ID)
			tab.Remove(a.ID, nil)
		}
		tab.Advance()
	}
	return ids
}

func TestTable(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(tab *Table) []string // returns what was released
		want []string
	}{
		{"present containers stay", func(tab *Table) []string {
			tab.Observe(map[string]bool{HostIface("a"): true, HostIface("b"): true})
			return released(tab, 10)
		}, nil},
		{"a veth deleted: released after the grace, not before", func(tab *Table) []string {
			tab.Gone(HostIface("a"))
			early := released(tab, 3)
			if len(early) > 0 {
				return append([]string{"early:"}, early...)
			}
			return released(tab, 1)
		}, []string{"a"}},
		{"missing at a check: the same", func(tab *Table) []string {
			tab.Observe(map[string]bool{HostIface("b"): true})
			return released(tab, 4)
		}, []string{"a"}},
		{"back within the grace: kept", func(tab *Table) []string {
			tab.Gone(HostIface("a"))
			r := released(tab, 2)
			tab.Observe(map[string]bool{HostIface("a"): true, HostIface("b"): true})
			return append(r, released(tab, 10)...)
		}, nil},
		{"attached again within the grace: kept", func(tab *Table) []string {
			tab.Gone(HostIface("a"))
			r := released(tab, 2)
			tab.Put(att("a", "10.32.0.1/12"))
			return append(r, released(tab, 10)...)
		}, nil},
		{"Docker said it died: gone though its veth lingers", func(tab *Table) []string {
			tab.Died("b")
			tab.Observe(map[string]bool{HostIface("a"): true, HostIface("b"): true})
			return released(tab, 4)
		}, []string{"b"}},
		{"died, then attached again: kept", func(tab *Table) []string {
			tab.Died("b")
			tab.Put(att("b", "10.32.0.2/12"))
			tab.Observe(map[string]bool{HostIface("a"): true, HostIface("b"): true})
			return released(tab, 10)
		}, nil},
		{"a second notice does not restart the grace", func(tab *Table) []string {
			tab.Gone(HostIface("a"))
			r := released(tab, 2)
			tab.Gone(HostIface("a"))
			tab.Observe(map[string]bool{HostIface("b"): true})
			return append(r, released(tab, 2)...)
		}, []string{"a"}},
		{"unknown veths and containers are ignored", func(tab *Table) []string {
			tab.Gone("eth0")
			tab.Died("nobody")
			tab.Observe(map[string]bool{HostIface("a"): true, HostIface("b"): true})
			return released(tab, 10)
		}, nil},
		{"detached while gone: nothing to release", func(tab *Table) []string {
			tab.Gone(HostIface("a"))
			tab.Remove("a", nil)
			return released(tab, 10)
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab := newTable(t, 3)
			tab.Put(att("a", "10.32.0.1/12"))
			tab.Put(att("b", "10.32.0.2/12"))
			tab.Ready()
			tab.Advance()
			if got := tc.run(tab); !slices.Equal(got, tc.want) {
				t.Errorf("released %v, want %v", got, tc.want)
			}
		})
	}
}

func TestFindAndRemove(t *testing.T) {
	tab := newTable(t, 0)
	dockerID := strings.Repeat("ab", 32)
	a := att(dockerID, "10.32.0.1/12", "10.32.0.9/12")
	a.Name = "web1"
	tab.Put(a)
	tab.Put(att("pid:42", "10.32.0.2/12"))
	tab.Put(att(dockerID[:2]+"x", "10.32.0.3/12"))
	for target, want := range map[string]string{
		dockerID: dockerID, "web1": dockerID, dockerID[:12]: dockerID, "pid:42": "pid:42",
		dockerID[:11]: "", "web": "", "nobody": "",
	} {
		if got := tab.Find(target); want == "" && len(got) != 0 || want != "" && (len(got) != 1 || got[0] != want) {
			t.Errorf("Find(%q) = %q, want %q", target, got, want)
		}
	}
	tab.Put(att(dockerID[:12]+"zz", "10.32.0.4/12")) // a second match
	if got := tab.Find(dockerID[:12]); len(got) != 2 {
		t.Errorf("an ambiguous prefix found %q", got)
	}
	tab.Remove(dockerID, []netip.Prefix{netip.MustParsePrefix("10.32.0.1/12")})
	if got, _ := tab.Get(dockerID); len(got.Addresses) != 1 || got.Addresses[0].String() != "10.32.0.9/12" {
		t.Errorf("after removing one address: %+v", got)
	}
	if got, _ := tab.Get(dockerID); got.HostIface != HostIface(dockerID) {
		t.Errorf("HostIface %q", got.HostIface)
	}
	tab.Remove(dockerID, nil)
	if _, ok := tab.Get(dockerID); ok {
		t.Error("still there after Remove")
	}
	if rd := tab.Ready(); rd.State == nil {
		t.Error("no state to save")
	}
	tab.Advance()
	tab.Put(att("pid:42", "10.32.0.2/12")) // the same again: nothing to save
	if rd := tab.Ready(); rd.State != nil {
		t.Error("an unchanged container is saved again")
	}
}

func TestState(t *testing.T) {
	tab := newTable(t, 0)
	a := att("x", "10.32.0.1/12")
	a.Name = "web.weave.local."
	tab.Put(a)
	tab.Put(att("y"))
	b := tab.Ready().State
	list, err := ParseState(b)
	if err != nil {
		t.Fatal(err)
	}
	if got := tab.List(); !slices.EqualFunc(got, list, equal) {
		t.Fatalf("round trip:\n%+v\n%+v", got, list)
	}
	// A file may not name the interface: it follows from the ID.
	evil := strings.Replace(string(b), HostIface("x"), "eth0", 1)
	list, err = ParseState([]byte(evil))
	if err != nil || list[0].HostIface != HostIface("x") {
		t.Errorf("a file naming eth0: %+v %v", list, err)
	}
	// The format of earlier versions loads.
	old := `[{"id": "/run/netns/c1", "netns": "/run/netns/c1", "hostIface": "vethwe123456789", "mac": "02:00:00:00:00:01",
		"addresses": ["10.32.0.5/12"], "name": "web1"}]`
	if list, err := ParseState([]byte(old)); err != nil || len(list) != 1 || list[0].Name != "web1" {
		t.Errorf("an earlier file: %+v %v", list, err)
	}
	for _, bad := range []string{
		`[null]`, `{}`, `[{}]`, `[{"id": ""}]`, `[{"id": "a b"}]`, `[{"id": "x"}, {"id": "x"}]`,
		`[{"id": "x", "addresses": ["fd00::1/64"]}]`, `[{"id": "x", "addresses": ["nonsense"]}]`,
		`[{"id": "x", "surprise": 1}]`, `[{"id": "x"}] [`, `[{"id": "x", "netns": "a\u0000b"}]`, ``, `nul`, `[]]`, `[] }`,
		`[{"id": "x", "addresses": ["0.0.0.0/0"]}]`, `[{"id": "x", "addresses": ["10.0.0.1/8", "10.0.0.1/8"]}]`,
	} {
		if _, err := ParseState([]byte(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%q: %v, want ErrCorrupt", bad, err)
		}
		if _, err := New(Config{}, []byte(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("New with %q: %v, want ErrCorrupt", bad, err)
		}
	}
	if _, err := New(Config{GraceTicks: -1}, nil); err == nil {
		t.Error("a negative grace was accepted")
	}
}

// model is what the schedule test expects of one container.
type model struct {
	attached bool
	present  bool  // its veth exists
	dead     bool  // Docker said it died since it was last attached
	since    int64 // tick it was noticed gone; -1 while not gone
	failed   int64 // tick its release last failed (then it is due again at the next); -1 if never
}

// TestSchedules drives a Table through random schedules (attach, detach,
// veths deleted and back, Docker deaths, checks, ticks, restarts from the
// saved table) and checks after every step against a model: a container
// is released exactly when it has been gone for more than the grace, never
// while it is present and not dead, never twice; the saved table always
// decodes to the table.
func TestSchedules(t *testing.T) {
	seeds := []uint64{*seed}
	if *seed == 0 {
		seeds = nil
		for s := range uint64(300) {
			seeds = append(seeds, s+1)
		}
	}
	for _, s := range seeds {
		if err := schedule(s); err != nil {
			t.Fatalf("seed %d: %v\nreplay: go test ./internal/containers -run TestSchedules -seed %d", s, err, s)
		}
	}
}

func schedule(seed uint64) error {
	r := rand.New(rand.NewPCG(seed, 0x636f6e74))
	grace := r.IntN(4)
	tab, err := New(Config{GraceTicks: grace}, nil)
	if err != nil {
		return err
	}
	ids := []string{"a", "b", "c", "d", "e"}
	m := map[string]*model{}
	for _, id := range ids {
		m[id] = &model{since: -1, failed: -1}
	}
	var saved []byte
	markGone := func(x *model) {
		if x.since < 0 {
			x.since = tab.Ticks()
		}
	}
	for step := range 400 {
		id := ids[r.IntN(len(ids))]
		x := m[id]
		op := r.IntN(8)
		switch op {
		case 0: // attach (again)
			tab.Put(att(id, fmt.Sprintf("10.32.0.%d/12", 1+r.IntN(200))))
			*x = model{attached: true, present: true, since: -1, failed: -1}
		case 1: // detach
			tab.Remove(id, nil)
			*x = model{since: -1, failed: -1}
		case 2: // the veth goes, and the kernel says so
			if x.attached {
				x.present = false
				markGone(x)
			}
			tab.Gone(HostIface(id))
		case 3: // the veth goes without a word
			x.present = false
		case 4: // Docker says it died
			if x.attached {
				x.dead = true
				markGone(x)
			}
			tab.Died(id)
		case 5: // the periodic check
			present := map[string]bool{}
			for _, other := range ids {
				if m[other].present {
					present[HostIface(other)] = true
				}
			}
			tab.Observe(present)
			for _, other := range ids {
				y := m[other]
				switch {
				case !y.attached:
				case y.present && !y.dead:
					y.since = -1
				default:
					markGone(y)
				}
			}
		case 6: // a restart from the saved table: gone marks are lost
			if saved != nil {
				if tab, err = New(Config{GraceTicks: grace}, saved); err != nil {
					return fmt.Errorf("step %d: restart: %v", step, err)
				}
				for _, y := range m {
					y.since, y.dead = -1, false
					if !y.attached {
						*y = model{since: -1, failed: -1}
					}
				}
			}
		default:
			tab.Tick()
		}
		rd := tab.Ready()
		for _, a := range rd.Released {
			y := m[a.ID]
			switch {
			case !y.attached:
				return fmt.Errorf("step %d: %s released twice, or never attached", step, a.ID)
			case y.present && !y.dead:
				return fmt.Errorf("step %d: %s released while present", step, a.ID)
			case y.since < 0 || tab.Ticks()-y.since <= int64(grace):
				return fmt.Errorf("step %d: %s released at tick %d, gone since %d, grace %d", step, a.ID, tab.Ticks(), y.since, grace)
			}
			if r.IntN(5) == 0 {
				y.failed = tab.Ticks() // the release failed: due again at the next tick
				continue
			}
			tab.Remove(a.ID, nil)
			*y = model{since: -1, failed: -1}
		}
		if len(rd.Released) > 0 {
			rd = tab.Ready() // the state after the removals
		}
		for _, other := range ids {
			y := m[other]
			if y.attached && y.since >= 0 && tab.Ticks()-y.since > int64(grace) && y.failed != tab.Ticks() {
				return fmt.Errorf("step %d: %s gone since %d, not released at tick %d (grace %d)", step, other, y.since, tab.Ticks(), grace)
			}
			if _, ok := tab.Get(other); ok != y.attached {
				return fmt.Errorf("step %d: %s in the table: %v, want %v", step, other, ok, y.attached)
			}
		}
		if rd.State != nil {
			saved = rd.State
			list, err := ParseState(saved)
			if err != nil {
				return fmt.Errorf("step %d: the saved table does not decode: %v", step, err)
			}
			if !slices.EqualFunc(list, tab.List(), equal) {
				return fmt.Errorf("step %d: saved %+v, table %+v", step, list, tab.List())
			}
		}
		tab.Advance()
	}
	return nil
}

// TestLose: an address given up moves to Lost, once, is saved and read
// back, and a file with a malformed or repeated lost address is refused.
func TestLose(t *testing.T) {
	tab := newTable(t, 1)
	tab.Put(att("c1", "10.32.0.5/12", "10.32.0.6/12"))
	tab.Advance()
	if _, ok := tab.Lose("c1", netip.MustParsePrefix("10.32.0.9/12")); ok {
		t.Fatal("lost an address the container does not have")
	}
	if _, ok := tab.Lose("nobody", netip.MustParsePrefix("10.32.0.5/12")); ok {
		t.Fatal("lost an address of an unknown container")
	}
	a, ok := tab.Lose("c1", netip.MustParsePrefix("10.32.0.5/32"))
	if !ok || fmt.Sprint(a.Addresses) != "[10.32.0.6/12]" || fmt.Sprint(a.Lost) != "[10.32.0.5/12]" {
		t.Fatalf("after Lose: %+v %v", a, ok)
	}
	if tab.Ready().State == nil {
		t.Fatal("Lose changed nothing to save")
	}
	b, err := EncodeState(tab.List())
	if err != nil {
		t.Fatal(err)
	}
	back, err := New(Config{}, b)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := back.Get("c1"); !slices.Equal(got.Lost, a.Lost) || !slices.Equal(got.Addresses, a.Addresses) {
		t.Fatalf("read back %+v, saved %+v", got, a)
	}
	for _, bad := range []string{
		`[{"id":"c1","netns":"/run/netns/c1","hostIface":"x","mac":"","addresses":[],"lost":["10.32.0.5/12","10.32.0.5/12"]}]`,
		`[{"id":"c1","netns":"/run/netns/c1","hostIface":"x","mac":"","addresses":[],"lost":["fe80::1/64"]}]`,
	} {
		if _, err := ParseState([]byte(bad)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("ParseState(%s): %v, want ErrCorrupt", bad, err)
		}
	}
}
