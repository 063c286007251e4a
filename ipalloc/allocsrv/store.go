package allocsrv

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/overlayd/overlayd/internal/atomicfile"
)

// The allocator's state lives in two files of the state directory:
//
//   - ipam.state, a snapshot, replaced whole (temporary file, fsync,
//     rename, fsync of the directory);
//   - ipam.journal, states appended after it, each made durable with one
//     fdatasync: half the cost of a snapshot, and an allocation is answered
//     only once its state is durable.
//
// Both hold records: magic "OVJ1" (4) | sequence number (8) | length (4) |
// CRC-32C of the payload (4) | CRC-32C of the 20 bytes before (4) |
// payload (the allocator's encoded state).
// The state with the highest sequence number wins. When the journal grows
// past journalMax (and eight states), a snapshot of the latest state
// replaces it.
//
// A journal that ends in a cut record is what a crash during a write
// leaves: that state was never acknowledged, and it is dropped with a log
// line. Only a record whose header checks and whose payload runs past the
// end of the file, or a tail too short for a header or all zeros, counts
// as cut. Anything else that does not check (a bad snapshot, a damaged
// header, a bad record followed by others) is corruption: the store
// refuses to open, and changes nothing.
const (
	JournalFile = "ipam.journal"
	recordHead  = 24
	journalMax  = 4 << 20
)

var recordMagic = [4]byte{'O', 'V', 'J', '1'}

type store struct {
	dir      string
	snapshot string // path
	journal  *os.File
	size     int64  // of the journal
	seq      uint64 // of the last state saved
	last     []byte // the last record saved
}

// AppendRecord appends a record of the journal's format to b.
func AppendRecord(b []byte, seq uint64, payload []byte) []byte {
	b = append(b, recordMagic[:]...)
	b = binary.BigEndian.AppendUint64(b, seq)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	b = binary.BigEndian.AppendUint32(b, crc32.Checksum(payload, castagnoli))
	b = binary.BigEndian.AppendUint32(b, crc32.Checksum(b[len(b)-20:], castagnoli))
	return append(b, payload...)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// errCut marks a record cut short at the end of a file.
var errCut = errors.New("record cut short")

// readRecord decodes the record at the start of b and returns its length.
// errCut means the header checks but the payload runs past the end of b,
// or b is shorter than a header.
func readRecord(b []byte) (seq uint64, payload []byte, n int, err error) {
	if len(b) < recordHead {
		return 0, nil, 0, errCut
	}
	if [4]byte(b[:4]) != recordMagic {
		return 0, nil, 0, errors.New("not a state record (bad magic)")
	}
	if crc32.Checksum(b[:20], castagnoli) != binary.BigEndian.Uint32(b[20:]) {
		return 0, nil, 0, errors.New("record header checksum mismatch")
	}
	seq = binary.BigEndian.Uint64(b[4:])
	l := int(binary.BigEndian.Uint32(b[12:]))
	if l > len(b)-recordHead {
		return 0, nil, 0, errCut
	}
	payload = b[recordHead : recordHead+l]
	if crc32.Checksum(payload, castagnoli) != binary.BigEndian.Uint32(b[16:]) {
		return 0, nil, 0, errors.New("checksum mismatch (altered or cut)")
	}
	return seq, payload, recordHead + l, nil
}

// Journal is what a journal holds.
type Journal struct {
	Seq   uint64 // the highest sequence number of its records; 0 if none
	State []byte // the payload of that record; it aliases the input
	Good  int    // bytes of whole records, from the start
	// Cut says the journal ends in an incomplete record (a crash while
	// saving: never acknowledged), which is dropped.
	Cut bool
}

// ParseJournal decodes a journal: whole records, optionally followed by a
// record cut short (its header checks and its payload runs past the end)
// or by zeros. Anything else is corruption: an error, with Good the
// offset of the bad record.
func ParseJournal(b []byte) (Journal, error) {
	var j Journal
	for j.Good < len(b) {
		seq, payload, n, err := readRecord(b[j.Good:])
		if err != nil {
			if errors.Is(err, errCut) || allZero(b[j.Good:]) {
				j.Cut = true
				return j, nil
			}
			return j, err
		}
		if seq > j.Seq {
			j.Seq, j.State = seq, payload
		}
		j.Good += n
	}
	return j, nil
}

// openStore reads the latest state (nil if there is none) and opens the
// journal for appending. warn is told about a cut final record.
func openStore(dir string, warn func(string)) (*store, []byte, error) {
	s := &store{dir: dir, snapshot: filepath.Join(dir, StateFile)}
	var state []byte
	b, err := os.ReadFile(s.snapshot)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, nil, fmt.Errorf("reading %s: %w", s.snapshot, err)
	default:
		seq, payload, n, err := readRecord(b)
		if err == nil && n != len(b) {
			err = fmt.Errorf("%d bytes after the state", len(b)-n)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("state file %s is corrupt: %v: restore it, or remove it (and %s) to start without the addresses it held", s.snapshot, err, JournalFile)
		}
		s.seq, state = seq, payload
	}
	jpath := filepath.Join(dir, JournalFile)
	j, err := os.ReadFile(jpath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, nil, fmt.Errorf("reading %s: %w", jpath, err)
	}
	jr, err := ParseJournal(j)
	if err != nil {
		return nil, nil, fmt.Errorf("journal %s is corrupt at byte %d: %v: restore it, or remove it and %s to start without the addresses they held", jpath, jr.Good, err, StateFile)
	}
	if jr.Cut {
		warn(fmt.Sprintf("journal %s ends in an incomplete record (%d bytes), left by a crash while saving: it is dropped", jpath, len(j)-jr.Good))
	}
	if jr.Seq > s.seq {
		s.seq, state = jr.Seq, jr.State
	}
	good := jr.Good
	_, statErr := os.Stat(jpath)
	// Not through a symbolic link: whoever planted one would have the
	// daemon append to, and truncate, a file of their choosing.
	f, err := os.OpenFile(jpath, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if errors.Is(err, syscall.ELOOP) {
		return nil, nil, fmt.Errorf("journal %s is a symbolic link: refused (move the file it points to in its place)", jpath)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("opening %s: %w", jpath, err)
	}
	if errors.Is(statErr, os.ErrNotExist) { // a new file: make its name durable
		if err := syncDir(dir); err != nil {
			f.Close()
			return nil, nil, err
		}
	}
	if err := f.Truncate(int64(good)); err != nil { // drop a cut record
		f.Close()
		return nil, nil, fmt.Errorf("truncating %s: %w", jpath, err)
	}
	if _, err := f.Seek(int64(good), io.SeekStart); err != nil {
		f.Close()
		return nil, nil, err
	}
	s.journal, s.size = f, int64(good)
	return s, state, nil
}

// allZero reports whether b holds only zeros (a file extended by a write
// that a crash cut before its data reached the disk).
func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// save makes state durable: appended to the journal, or written as a new
// snapshot when the journal has grown large.
func (s *store) save(state []byte) error {
	s.seq++
	rec := AppendRecord(nil, s.seq, state)
	s.last = rec
	if s.size+int64(len(rec)) > max(journalMax, 8*int64(len(rec))) {
		return s.compact()
	}
	if _, err := s.journal.Write(rec); err != nil {
		return fmt.Errorf("writing %s: %w", s.journal.Name(), err)
	}
	if err := syscall.Fdatasync(int(s.journal.Fd())); err != nil {
		return fmt.Errorf("syncing %s: %w", s.journal.Name(), err)
	}
	s.size += int64(len(rec))
	return nil
}

// compact writes the last state saved as the snapshot, then empties the
// journal. A crash in between leaves older states in the journal, which
// the snapshot's higher sequence number outranks.
func (s *store) compact() error {
	if s.last == nil || s.size == 0 {
		return nil // the snapshot is up to date
	}
	if err := atomicfile.Write(s.snapshot, s.last); err != nil {
		return err
	}
	if err := s.journal.Truncate(0); err != nil {
		return fmt.Errorf("truncating %s: %w", s.journal.Name(), err)
	}
	if _, err := s.journal.Seek(0, io.SeekStart); err != nil {
		return err
	}
	s.size = 0
	return s.journal.Sync()
}

func (s *store) close() error { return s.journal.Close() }

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}
