package names

import (
	"errors"
	"fmt"
	"strings"

	"github.com/overlayd/overlayd/proto"
)

// ErrOutside marks a name that is not below the served domain.
var ErrOutside = errors.New("names: outside the domain")

// CheckDomain checks a domain to serve and returns it in lower case with
// its trailing dot added.
func CheckDomain(d string) (string, error) {
	d = strings.ToLower(d)
	if !strings.HasSuffix(d, ".") {
		d += "."
	}
	if d == "." {
		return d, errors.New("names: the domain must not be the root")
	}
	if err := checkName(d); err != nil {
		return d, fmt.Errorf("names: domain %q: %w", d, err)
	}
	return d, nil
}

// FQDN turns a hostname given for registration into the name stored: a
// single label gets the domain; other names get their trailing dot. Names
// not strictly below the domain are ErrOutside (with the FQDN returned,
// for the message).
func (s *Store) FQDN(hostname string) (string, error) {
	h := hostname
	switch {
	case h == "":
		return "", errors.New("names: empty hostname")
	case !strings.Contains(h, "."):
		h += "." + s.cfg.Domain
	case !strings.HasSuffix(h, "."):
		h += "."
	}
	if err := checkName(h); err != nil {
		return h, fmt.Errorf("names: hostname %q: %w", hostname, err)
	}
	if !s.inDomain(h) {
		return h, fmt.Errorf("%w: %s is not below %s", ErrOutside, h, s.cfg.Domain)
	}
	return h, nil
}

// inDomain reports whether fqdn is strictly below the domain.
func (s *Store) inDomain(fqdn string) bool {
	d := s.cfg.Domain
	return len(fqdn) > len(d)+1 && fqdn[len(fqdn)-len(d)-1] == '.' && strings.EqualFold(fqdn[len(fqdn)-len(d):], d)
}

// checkName checks an FQDN with its trailing dot: at most
// proto.MaxHostnameLen bytes, labels of 1 to 63 letters, digits, hyphens
// and underscores.
func checkName(fqdn string) error {
	if len(fqdn) < 2 || len(fqdn) > proto.MaxHostnameLen || fqdn[len(fqdn)-1] != '.' {
		return fmt.Errorf("not a name of 1 to %d bytes with a trailing dot", proto.MaxHostnameLen-1)
	}
	label := 0
	for i := range len(fqdn) {
		c := fqdn[i]
		switch {
		case c == '.':
			if label == 0 {
				return errors.New("empty label")
			}
			label = 0
		case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_':
			label++
			if label > 63 {
				return errors.New("label longer than 63 bytes")
			}
		default:
			return fmt.Errorf("byte %q not allowed (letters, digits, '-' and '_')", c)
		}
	}
	return nil
}

// checkID checks a container ID: 1 to 255 printable ASCII bytes.
func checkID(id string) error {
	if id == "" || len(id) > proto.MaxContainerLen {
		return fmt.Errorf("names: container ID of %d bytes (want 1 to %d)", len(id), proto.MaxContainerLen)
	}
	for i := range len(id) {
		if id[i] <= ' ' || id[i] > '~' {
			return fmt.Errorf("names: container ID %q: byte %q not allowed", id, id[i])
		}
	}
	return nil
}

// checkEntry checks a saved entry of ours.
func (s *Store) checkEntry(e *proto.NameEntry) error {
	if err := checkName(e.Hostname); err != nil {
		return err
	}
	if !s.inDomain(e.Hostname) {
		return ErrOutside
	}
	return checkID(e.ContainerID)
}
