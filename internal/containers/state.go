package containers

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"unicode/utf8"
)

// The saved table, attached.json, is a JSON list of Attachments sorted by
// ID, as overlayd has always written it.

// ErrCorrupt is wrapped by ParseState's errors.
var ErrCorrupt = errors.New("containers: the saved table is corrupt")

// Bounds of a saved entry.
const (
	MaxIDLen    = 255  // an allocation ID
	MaxPathLen  = 4096 // a namespace path
	MaxAddrs    = 64   // addresses of one container
	MaxEntries  = 1 << 16
	maxNameLen  = 253
	maxFileSize = 64 << 20
)

// EncodeState encodes a list of containers (List's order).
func EncodeState(list []Attachment) ([]byte, error) {
	for i := range list {
		if list[i].Addresses == nil {
			list[i].Addresses = []netip.Prefix{}
		}
	}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("containers: encoding the table: %w", err)
	}
	return append(b, '\n'), nil
}

// ParseState decodes a saved table. Anything that is not a list of
// well-formed, distinct entries is ErrCorrupt, with the reason: a damaged
// file is refused whole rather than half-read. Each entry's HostIface is
// derived from its ID, never read from the file: a file cannot name an
// interface for overlayd to delete.
func ParseState(b []byte) ([]Attachment, error) {
	if len(b) > maxFileSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrCorrupt, len(b))
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var list []*Attachment
	if err := dec.Decode(&list); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: data after the list", ErrCorrupt)
	}
	if len(list) > MaxEntries {
		return nil, fmt.Errorf("%w: %d entries", ErrCorrupt, len(list))
	}
	out := make([]Attachment, 0, len(list))
	seen := map[string]bool{}
	for i, a := range list {
		if err := check(a); err != nil {
			return nil, fmt.Errorf("%w: entry %d: %v", ErrCorrupt, i, err)
		}
		if seen[a.ID] {
			return nil, fmt.Errorf("%w: entry %d: %q twice", ErrCorrupt, i, a.ID)
		}
		seen[a.ID] = true
		c := a.clone()
		c.HostIface = HostIface(c.ID)
		out = append(out, c)
	}
	return out, nil
}

func check(a *Attachment) error {
	switch {
	case a == nil:
		return errors.New("null")
	case a.ID == "" || len(a.ID) > MaxIDLen || !printable(a.ID):
		return fmt.Errorf("bad ID %q", a.ID)
	case len(a.NetNS) > MaxPathLen || strings.ContainsRune(a.NetNS, 0):
		return errors.New("bad namespace path")
	case len(a.MAC) > 64 || len(a.Name) > maxNameLen || !utf8.ValidString(a.Name):
		return errors.New("bad MAC or name")
	case len(a.Addresses) > MaxAddrs || len(a.Lost) > MaxAddrs:
		return fmt.Errorf("%d addresses, %d lost", len(a.Addresses), len(a.Lost))
	}
	if err := checkAddrs(a.Addresses); err != nil {
		return err
	}
	if err := checkAddrs(a.Lost); err != nil {
		return fmt.Errorf("lost: %w", err)
	}
	return nil
}

func checkAddrs(ps []netip.Prefix) error {
	for i, p := range ps {
		switch {
		case !p.IsValid() || !p.Addr().Is4() || p.Bits() == 0:
			return fmt.Errorf("address %v is not an IPv4 address with its mask", p)
		case slices.ContainsFunc(ps[:i], func(q netip.Prefix) bool { return q.Addr() == p.Addr() }):
			return fmt.Errorf("address %v twice", p.Addr())
		}
	}
	return nil
}

// printable reports whether s has no space or control character (the
// API's rule for IDs).
func printable(s string) bool {
	for _, r := range s {
		if r < 0x21 || r == 0x7f || r == utf8.RuneError {
			return false
		}
	}
	return true
}
