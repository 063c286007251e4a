package fuzz

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/overlayd/overlayd/internal/containers"
	"github.com/overlayd/overlayd/internal/daemon"
	"github.com/overlayd/overlayd/ipalloc/allocsrv"
)

// FuzzContainersState feeds the attached containers' table
// (attached.json) damaged bytes: ParseState never panics, refuses with
// ErrCorrupt, and what it accepts has IDs, IPv4 addresses and host veths
// derived from the IDs, and survives EncodeState and ParseState unchanged.
func FuzzContainersState(f *testing.F) {
	for _, s := range []string{
		`[{"id": "/run/netns/c1", "netns": "/run/netns/c1", "hostIface": "vethwe9bd3c4e52", "mac": "02:42:ac:11:00:02",` +
			` "addresses": ["10.32.0.5/12", "10.32.0.6/12"], "name": "web1"}]`,
		`[{"id": "pid:42", "netns": "/proc/42/ns/net", "hostIface": "eth0", "mac": "", "addresses": []}]`,
		`[null]`, `[{}]`, `[{"id": "x"}, {"id": "x"}]`, `[{"id": "x", "addresses": ["fd00::1/64"]}]`, `[]`, `null`, `{}`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		list, err := containers.ParseState(b)
		if err != nil {
			if !errors.Is(err, containers.ErrCorrupt) {
				t.Fatalf("an error that is not ErrCorrupt: %v", err)
			}
			return
		}
		for _, a := range list {
			if a.ID == "" || a.HostIface != containers.HostIface(a.ID) {
				t.Fatalf("kept %+v", a)
			}
			for _, p := range a.Addresses {
				if !p.Addr().Is4() {
					t.Fatalf("kept address %v", p)
				}
			}
		}
		out, err := containers.EncodeState(slices.Clone(list))
		if err != nil {
			t.Fatal(err)
		}
		again, err := containers.ParseState(out)
		if err != nil || len(again) != len(list) {
			t.Fatalf("reading back %s: %v", out, err)
		}
		for i := range list {
			if again[i].ID != list[i].ID || again[i].Name != list[i].Name || !slices.Equal(again[i].Addresses, list[i].Addresses) {
				t.Fatalf("read back differs:\n%+v\n%+v", list[i], again[i])
			}
		}
	})
}

// FuzzAllocsrvJournal feeds the allocator's journal (ipam.journal) damaged
// bytes: ParseJournal never panics; what it accepts is whole records up to
// Good, then nothing or one cut record; the records it read, written again,
// parse to the same latest state.
func FuzzAllocsrvJournal(f *testing.F) {
	var j []byte
	for i := range 4 {
		j = allocsrv.AppendRecord(j, uint64(i+1), bytes.Repeat([]byte{byte(i)}, 5+i))
	}
	f.Add(j)
	f.Add(j[:len(j)-3])                     // the last record cut: a crash while saving
	f.Add(append(bytes.Clone(j), 0, 0, 0))  // zeros after it
	f.Add(append(bytes.Clone(j), 'O', 'V')) // a header cut
	bad := bytes.Clone(j)
	bad[30] ^= 1 // a flipped bit in the second record
	f.Add(bad)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		jr, err := allocsrv.ParseJournal(b)
		if jr.Good < 0 || jr.Good > len(b) {
			t.Fatalf("Good %d of %d bytes", jr.Good, len(b))
		}
		if err != nil || jr.Cut {
			// What precedes the bad or cut record parses alone, whole.
			head, err := allocsrv.ParseJournal(b[:jr.Good])
			if err != nil || head.Cut || head.Seq != jr.Seq || !bytes.Equal(head.State, jr.State) {
				t.Fatalf("the good part alone: %+v %v; whole: %+v", head, err, jr)
			}
			return
		}
		if jr.Good != len(b) {
			t.Fatalf("accepted %d of %d bytes without a cut", jr.Good, len(b))
		}
		if jr.Seq > 0 {
			again, err := allocsrv.ParseJournal(allocsrv.AppendRecord(nil, jr.Seq, jr.State))
			if err != nil || again.Seq != jr.Seq || !bytes.Equal(again.State, jr.State) {
				t.Fatalf("the latest record written again: %+v %v", again, err)
			}
		}
	})
}

// FuzzDaemonExposed feeds the exposed addresses' file (exposed.json)
// damaged bytes: ParseExposed never panics, keeps only distinct IPv4
// addresses, and what it keeps reads back the same.
func FuzzDaemonExposed(f *testing.F) {
	for _, s := range []string{`["172.16.16.201/24", "10.99.0.5/24"]`, `[]`, `["10.0.0.1"]`, `["fd00::1/64"]`,
		`["10.0.0.1/24", "10.0.0.1/16"]`, `[null]`, `{}`, `null`, ``} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		ps, err := daemon.ParseExposed(b)
		if err != nil {
			return
		}
		for i, p := range ps {
			if !p.Addr().Is4() || slices.ContainsFunc(ps[:i], func(q netip.Prefix) bool { return q.Addr() == p.Addr() }) {
				t.Fatalf("kept %v in %v", p, ps)
			}
		}
		out, err := json.Marshal(ps)
		if err != nil {
			t.Fatal(err)
		}
		again, err := daemon.ParseExposed(out)
		if err != nil || !slices.Equal(again, ps) && len(ps) > 0 {
			t.Fatalf("read back %s: %v %v", out, again, err)
		}
	})
}
