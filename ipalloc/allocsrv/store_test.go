package allocsrv

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func journalOf(n int) []byte {
	var j []byte
	for i := 1; i <= n; i++ {
		j = AppendRecord(j, uint64(i), bytes.Repeat([]byte{byte(i)}, 10+i))
	}
	return j
}

// TestJournal: the last state wins; a record cut at the end (or zeros
// after the last record) is dropped with a warning; any other damage is
// refused and leaves the file as it was.
func TestJournal(t *testing.T) {
	full := journalOf(3)
	second := len(journalOf(1)) // offset of record 2
	lengthFlip := append([]byte{}, full...)
	binary.BigEndian.PutUint32(lengthFlip[second+12:], binary.BigEndian.Uint32(lengthFlip[second+12:])|1<<20)
	payloadFlip := append([]byte{}, full...)
	payloadFlip[second+recordHead+2] ^= 1
	for _, tc := range []struct {
		name    string
		journal []byte
		want    byte // first byte of the state read; 0: refused
		warned  bool
	}{
		{"whole", full, 3, false},
		{"cut in the last payload", full[:len(full)-4], 2, true},
		{"cut in the last header", full[:len(journalOf(2))+10], 2, true},
		{"zeros after the last record", append(append([]byte{}, full...), make([]byte, 100)...), 3, true},
		{"length of a middle record altered", lengthFlip, 0, false},
		{"payload of a middle record altered", payloadFlip, 0, false},
		{"garbage at the end", append(append([]byte{}, full...), []byte("garbage that is long enough to hold a header")...), 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, JournalFile)
			if err := os.WriteFile(path, tc.journal, 0o600); err != nil {
				t.Fatal(err)
			}
			var warned string
			s, state, err := openStore(dir, func(m string) { warned = m })
			if tc.want == 0 {
				if err == nil || !strings.Contains(err.Error(), path) {
					t.Fatalf("accepted, or the error does not name the file: %v", err)
				}
				if now, _ := os.ReadFile(path); !bytes.Equal(now, tc.journal) {
					t.Fatal("a refused journal was changed")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer s.close()
			if len(state) == 0 || state[0] != tc.want {
				t.Fatalf("state %v, want the one of record %d", state, tc.want)
			}
			if (warned != "") != tc.warned {
				t.Fatalf("warning %q", warned)
			}
		})
	}
}

// TestSnapshot: a clean stop moves the journal into the snapshot; a
// damaged snapshot is refused.
func TestSnapshot(t *testing.T) {
	dir := t.TempDir()
	s, _, err := openStore(dir, func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := s.save([]byte{byte(i + 1)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.compact(); err != nil {
		t.Fatal(err)
	}
	s.close()
	if j, _ := os.ReadFile(filepath.Join(dir, JournalFile)); len(j) != 0 {
		t.Fatalf("journal of %d bytes after compaction", len(j))
	}
	s, state, err := openStore(dir, func(string) {})
	if err != nil || len(state) != 1 || state[0] != 3 {
		t.Fatalf("after compaction: %v %v", state, err)
	}
	s.close()
	snap := filepath.Join(dir, StateFile)
	b, _ := os.ReadFile(snap)
	for _, bad := range [][]byte{b[:len(b)-1], {}, append(append([]byte{}, b...), 0)} {
		os.WriteFile(snap, bad, 0o600)
		if _, _, err := openStore(dir, func(string) {}); err == nil || !strings.Contains(err.Error(), snap) {
			t.Errorf("damaged snapshot of %d bytes: %v", len(bad), err)
		}
	}
}

// TestJournalSymlinkRefused: a journal that is a symbolic link is refused,
// and the file it points to is left as it was.
func TestJournalSymlinkRefused(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("not a journal"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, JournalFile)); err != nil {
		t.Fatal(err)
	}
	_, _, err := openStore(dir, func(string) {})
	if err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("a symlinked journal: %v", err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "not a journal" {
		t.Errorf("the link's target changed: %q", b)
	}
}
