package proto

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

// TestNamesGolden pins the bytes of the "nameserver" channel's payloads:
//
//	1 entries  n (2) | n × (hostname 1+h | IPv4 address 4 | container ID 1+c |
//	           origin 6 | version 4 | flags 1: 0x01 tombstone | tombstone age in seconds 4)
//	2 digest   echo (1) | n (2) | n × (origin 6 | hash 8), origins ascending
func TestNamesGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		msg  NamesMsg
		hex  string
	}{
		{"entries", NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: "web.weave.local.", Addr: netip.MustParseAddr("10.32.0.1"), ContainerID: "c1",
				Origin: 0x12d2fe7ac1f2, Version: 3, Tombstone: true, AgeMillis: 60},
			{Hostname: "A.b.", Addr: netip.MustParseAddr("10.32.0.2"), ContainerID: "",
				Origin: 0x7e214a702f45, Version: MaxNameVersion},
		}}, "01 0002" +
			" 10 7765622e77656176652e6c6f63616c2e 0a200001 02 6331 12d2fe7ac1f2 00000003 01 0000003c" +
			" 04 412e622e 0a200002 00 7e214a702f45 80000000 00 00000000"},
		{"no entries", NamesMsg{Kind: NamesEntries}, "01 0000"},
		{"signed entries", NamesMsg{Kind: NamesSignedEntries, Entries: []NameEntry{
			{Hostname: "A.b.", Addr: netip.MustParseAddr("10.32.0.2"), Origin: 0x7e214a702f45, Version: 1, Sig: [NameSigLen]byte{0xee}},
		}}, "04 0001 04 412e622e 0a200002 00 7e214a702f45 00000001 00 00000000 ee" + strings.Repeat("00", NameSigLen-1)},
		{"digest", NamesMsg{Kind: NamesDigest, Echo: true, Digests: []NameDigest{
			{Origin: 0x12d2fe7ac1f2, Hash: 0x1122334455667788}, {Origin: 0x7e214a702f45, Hash: 1}}},
			"02 01 0002 12d2fe7ac1f2 1122334455667788 7e214a702f45 0000000000000001"},
		{"empty digest", NamesMsg{Kind: NamesDigest}, "02 00 0000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := AppendNamesMsg(nil, &tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			if want := strings.ReplaceAll(tc.hex, " ", ""); hex.EncodeToString(b) != want {
				t.Fatalf("\n got %x\nwant %s", b, want)
			}
		})
	}
}

// normalNames makes the empty slices of a parsed message nil, as an
// encoded one's may be.
func normalNames(m NamesMsg) NamesMsg {
	if len(m.Entries) == 0 {
		m.Entries = nil
	}
	if len(m.Digests) == 0 {
		m.Digests = nil
	}
	return m
}

func TestNamesRoundTrip(t *testing.T) {
	a := netip.MustParseAddr("10.32.0.1")
	many := make([]NameEntry, MaxNameEntries)
	for i := range many {
		many[i] = NameEntry{Hostname: "h.", Addr: a, ContainerID: "c", Origin: PeerName(i + 1), Version: uint32(i)}
	}
	digests := make([]NameDigest, MaxNameDigests)
	for i := range digests {
		digests[i] = NameDigest{Origin: PeerName(i + 1), Hash: uint64(i) * 0x9e3779b97f4a7c15}
	}
	for _, tc := range []struct {
		name string
		msg  NamesMsg
	}{
		{"live entry", NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: "web.weave.local.", Addr: a, ContainerID: "4bd4b3a3a6c8", Origin: 1}}}},
		{"tombstone without age", NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: "web.weave.local.", Addr: a, ContainerID: "c", Origin: 1, Version: 1, Tombstone: true}}}},
		{"tombstone with age", NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: "Web.Weave.Local.", Addr: a, ContainerID: "weave:extern", Origin: maxPeerName, Version: 9,
				Tombstone: true, AgeMillis: 1799}}}},
		{"largest fields", NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: strings.Repeat("h", MaxHostnameLen), Addr: netip.MustParseAddr("255.255.255.255"),
				ContainerID: strings.Repeat("c", MaxContainerLen), Origin: maxPeerName, Version: MaxNameVersion,
				Tombstone: true, AgeMillis: MaxNameAgeMillis}}}},
		{"smallest fields", NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: "x", Addr: netip.IPv4Unspecified(), Origin: 1}}}},
		{"mixed", NamesMsg{Kind: NamesEntries, Entries: []NameEntry{
			{Hostname: "a.", Addr: a, ContainerID: "1", Origin: 5, Version: 2, Tombstone: true, AgeMillis: 3},
			{Hostname: "a.", Addr: a, ContainerID: "1", Origin: 5, Version: 2},
			{Hostname: "b.", Addr: netip.MustParseAddr("10.32.0.2"), ContainerID: "2", Origin: 4, Version: 0},
		}}},
		{"no entries", NamesMsg{Kind: NamesEntries}},
		{"most entries", NamesMsg{Kind: NamesEntries, Entries: many}},
		{"signed tombstone", NamesMsg{Kind: NamesSignedEntries, Entries: []NameEntry{
			{Hostname: "a.", Addr: a, ContainerID: "1", Origin: 5, Version: 2, Tombstone: true, AgeMillis: 3, Sig: [NameSigLen]byte{1, 2}}}}},
		{"digest with echo", NamesMsg{Kind: NamesDigest, Echo: true, Digests: []NameDigest{{Origin: 1, Hash: 2}, {Origin: 3, Hash: 0}}}},
		{"digest without echo", NamesMsg{Kind: NamesDigest, Digests: []NameDigest{{Origin: maxPeerName, Hash: ^uint64(0)}}}},
		{"empty digest with echo", NamesMsg{Kind: NamesDigest, Echo: true}},
		{"largest digest", NamesMsg{Kind: NamesDigest, Digests: digests}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := AppendNamesMsg([]byte("prefix"), &tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			if string(b[:6]) != "prefix" {
				t.Fatal("AppendNamesMsg overwrote what it appends to")
			}
			b = b[6:]
			// names.Store splits messages by this size.
			if tc.msg.Kind == NamesEntries || tc.msg.Kind == NamesSignedEntries {
				size := 3
				for _, e := range tc.msg.Entries {
					size += NameEntrySize(&e, tc.msg.Kind)
				}
				if len(b) != size {
					t.Errorf("%d bytes, want %d", len(b), size)
				}
			} else if len(b) != 4+14*len(tc.msg.Digests) {
				t.Errorf("digest of %d bytes", len(b))
			}
			got, err := ParseNamesMsg(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(normalNames(got), normalNames(tc.msg)) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, tc.msg)
			}
			again, err := AppendNamesMsg(nil, &got)
			if err != nil || !bytes.Equal(again, b) {
				t.Fatalf("re-encoding: %v\n% x\n% x", err, again, b)
			}
			// The result does not alias the input.
			for i := range b {
				b[i] ^= 0xff
			}
			if !reflect.DeepEqual(normalNames(got), normalNames(tc.msg)) {
				t.Fatal("the parsed message changed with its input")
			}
		})
	}
}

// rawEntry encodes an entry without checking it.
func rawEntry(host string, addr [4]byte, id string, origin PeerName, version uint32, flags byte, age uint32) []byte {
	b := append([]byte{byte(len(host))}, host...)
	b = append(b, addr[:]...)
	b = append(b, byte(len(id)))
	b = append(b, id...)
	b = appendName(b, origin)
	b = binary.BigEndian.AppendUint32(b, version)
	b = append(b, flags)
	return binary.BigEndian.AppendUint32(b, age)
}

// rawEntries frames encoded entries with a count.
func rawEntries(count uint16, entries ...[]byte) []byte {
	b := binary.BigEndian.AppendUint16([]byte{byte(NamesEntries)}, count)
	for _, e := range entries {
		b = append(b, e...)
	}
	return b
}

// rawDigest encodes a digest without checking it.
func rawDigest(echo byte, count uint16, ds ...NameDigest) []byte {
	b := binary.BigEndian.AppendUint16([]byte{byte(NamesDigest), echo}, count)
	for _, d := range ds {
		b = appendName(b, d.Origin)
		b = binary.BigEndian.AppendUint64(b, d.Hash)
	}
	return b
}

// errAny stands for any decoding error.
var errAny = errors.New("any error")

func TestNamesRejectMalformed(t *testing.T) {
	ip := [4]byte{10, 32, 0, 1}
	good := rawEntry("web.weave.local.", ip, "c1", 5, 1, 0, 0)
	tomb := rawEntry("web.weave.local.", ip, "c1", 5, 2, 1, 30)
	if _, err := ParseNamesMsg(rawEntries(2, good, tomb)); err != nil {
		t.Fatalf("the base message: %v", err)
	}
	digest := rawDigest(1, 2, NameDigest{Origin: 1, Hash: 7}, NameDigest{Origin: 2, Hash: 8})
	if _, err := ParseNamesMsg(digest); err != nil {
		t.Fatalf("the base digest: %v", err)
	}
	for _, tc := range []struct {
		name  string
		input []byte
		want  error
	}{
		{"empty", nil, ErrShort},
		{"kind zero", []byte{0}, ErrMalform},
		{"kind five", []byte{5, 0, 0}, ErrMalform},
		{"summary cut short", []byte{3, 0, 0}, ErrMalform},
		{"summary too long", []byte{3, 0, 0, 0, 0, 0, 0, 0, 0, 0}, ErrMalform},
		{"kind 255", append([]byte{255}, rawEntries(1, good)[1:]...), ErrMalform},
		{"entries without a count", []byte{1}, ErrShort},
		{"entries with half a count", []byte{1, 0}, ErrShort},
		{"more entries counted than sent", rawEntries(3, good, tomb), ErrShort},
		{"fewer entries counted than sent", rawEntries(1, good, tomb), ErrMalform},
		{"trailing byte", append(rawEntries(2, good, tomb), 0), ErrMalform},
		{"last entry cut", rawEntries(2, good, tomb)[:len(rawEntries(2, good, tomb))-1], ErrShort},
		{"hostname past the end", rawEntries(1, append([]byte{200}, good[1:]...)), ErrShort},
		{"container ID past the end", rawEntries(1, func() []byte {
			e := rawEntry("web.weave.local.", ip, "c1", 5, 1, 0, 0)
			e[21] = 200
			return e
		}()), ErrShort},
		{"entry cut in the address", rawEntries(1, rawEntry(strings.Repeat("h", 20), ip, "c1", 5, 1, 0, 0)[:23]), ErrShort},
		{"entry cut after the container ID", rawEntries(1, rawEntry("web.weave.local.", ip, "c1", 5, 1, 0, 0)[:30]), ErrShort},
		{"too many entries", rawEntries(MaxNameEntries+1, bytes.Repeat(rawEntry("h.", ip, "", 5, 0, 0, 0), MaxNameEntries+1)), errAny},
		{"empty hostname", rawEntries(1, rawEntry("", ip, "c1", 5, 1, 0, 0)), ErrMalform},
		{"hostname of 255 bytes", rawEntries(1, rawEntry(strings.Repeat("h", 255), ip, "c1", 5, 1, 0, 0)), ErrMalform},
		{"flags 0x02", rawEntries(1, rawEntry("h.", ip, "c", 5, 1, 0x02, 0)), ErrMalform},
		{"flags 0x81", rawEntries(1, rawEntry("h.", ip, "c", 5, 1, 0x81, 0)), ErrMalform},
		{"flags bad in the second entry", rawEntries(2, good, rawEntry("h.", ip, "c", 5, 1, 0x10, 0)), ErrMalform},
		{"zero origin", rawEntries(1, rawEntry("h.", ip, "c", 0, 1, 0, 0)), ErrMalform},
		{"version over MaxNameVersion", rawEntries(1, rawEntry("h.", ip, "c", 5, MaxNameVersion+1, 0, 0)), ErrMalform},
		{"version all ones", rawEntries(1, rawEntry("h.", ip, "c", 5, ^uint32(0), 1, 0)), ErrMalform},
		{"age on a live entry", rawEntries(1, rawEntry("h.", ip, "c", 5, 1, 0, 1)), ErrMalform},
		{"age over a day", rawEntries(1, rawEntry("h.", ip, "c", 5, 1, 1, MaxNameAgeMillis+1)), ErrMalform},
		{"digest without echo byte", []byte{2}, ErrMalform},
		{"digest without count", []byte{2, 1, 0}, ErrMalform},
		{"digest echo 2", rawDigest(2, 0), ErrMalform},
		{"digest echo 0xff", rawDigest(0xff, 1, NameDigest{Origin: 1}), ErrMalform},
		{"digest count over the items", rawDigest(1, 3, NameDigest{Origin: 1}, NameDigest{Origin: 2}), ErrMalform},
		{"digest count under the items", rawDigest(1, 1, NameDigest{Origin: 1}, NameDigest{Origin: 2}), ErrMalform},
		{"digest item cut", digest[:len(digest)-1], ErrMalform},
		{"digest trailing byte", append(bytes.Clone(digest), 0), ErrMalform},
		{"digest origins descending", rawDigest(0, 2, NameDigest{Origin: 2}, NameDigest{Origin: 1}), ErrMalform},
		{"digest origins repeated", rawDigest(0, 2, NameDigest{Origin: 2}, NameDigest{Origin: 2}), ErrMalform},
		{"digest of too many origins", func() []byte {
			ds := make([]NameDigest, MaxNameDigests+1)
			for i := range ds {
				ds[i].Origin = PeerName(i + 1)
			}
			return rawDigest(0, MaxNameDigests+1, ds...)
		}(), ErrMalform},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := ParseNamesMsg(tc.input)
			if err == nil {
				t.Fatalf("accepted %+v", m)
			}
			if tc.want != errAny && !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	t.Run("every truncation", func(t *testing.T) {
		for _, b := range [][]byte{rawEntries(2, good, tomb), digest} {
			for n := range len(b) {
				if m, err := ParseNamesMsg(b[:n]); err == nil {
					t.Fatalf("accepted %d of %d bytes: %+v", n, len(b), m)
				}
			}
		}
	})
	t.Run("limits accepted", func(t *testing.T) {
		for _, b := range [][]byte{
			rawEntries(1, rawEntry("h.", ip, "c", 5, MaxNameVersion, 1, MaxNameAgeMillis)),
			rawEntries(1, rawEntry(strings.Repeat("h", MaxHostnameLen), ip, strings.Repeat("c", 255), maxPeerName, 0, 0, 0)),
		} {
			if _, err := ParseNamesMsg(b); err != nil {
				t.Fatal(err)
			}
		}
	})
}

func TestNamesEncoderRefuses(t *testing.T) {
	a := netip.MustParseAddr("10.32.0.1")
	ok := NameEntry{Hostname: "h.", Addr: a, ContainerID: "c", Origin: 1}
	with := func(f func(*NameEntry)) NamesMsg {
		e := ok
		f(&e)
		return NamesMsg{Kind: NamesEntries, Entries: []NameEntry{ok, e}}
	}
	for _, tc := range []struct {
		name string
		msg  NamesMsg
		want error
	}{
		{"IPv6 address", with(func(e *NameEntry) { e.Addr = netip.MustParseAddr("fd00::1") }), ErrMalform},
		{"IPv4-mapped address", with(func(e *NameEntry) { e.Addr = netip.MustParseAddr("::ffff:10.0.0.1") }), ErrMalform},
		{"no address", with(func(e *NameEntry) { e.Addr = netip.Addr{} }), ErrMalform},
		{"empty hostname", with(func(e *NameEntry) { e.Hostname = "" }), ErrMalform},
		{"hostname of 255 bytes", with(func(e *NameEntry) { e.Hostname = strings.Repeat("h", 255) }), ErrMalform},
		{"container ID of 256 bytes", with(func(e *NameEntry) { e.ContainerID = strings.Repeat("c", 256) }), ErrMalform},
		{"zero origin", with(func(e *NameEntry) { e.Origin = 0 }), ErrMalform},
		{"version over MaxNameVersion", with(func(e *NameEntry) { e.Version = MaxNameVersion + 1 }), ErrMalform},
		{"age on a live entry", with(func(e *NameEntry) { e.AgeMillis = 1 }), ErrMalform},
		{"age over a day", with(func(e *NameEntry) { e.Tombstone, e.AgeMillis = true, MaxNameAgeMillis+1 }), ErrMalform},
		{"too many entries", NamesMsg{Kind: NamesEntries, Entries: make([]NameEntry, MaxNameEntries+1)}, ErrTooLarge},
		{"too many digests", NamesMsg{Kind: NamesDigest, Digests: make([]NameDigest, MaxNameDigests+1)}, ErrTooLarge},
		{"digests out of order", NamesMsg{Kind: NamesDigest, Digests: []NameDigest{{Origin: 2}, {Origin: 1}}}, ErrMalform},
		{"digests repeated", NamesMsg{Kind: NamesDigest, Digests: []NameDigest{{Origin: 2}, {Origin: 2}}}, ErrMalform},
		{"kind zero", NamesMsg{}, ErrMalform},
		{"kind five", NamesMsg{Kind: 5, Entries: []NameEntry{ok}}, ErrMalform},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if b, err := AppendNamesMsg(nil, &tc.msg); !errors.Is(err, tc.want) {
				t.Fatalf("got % x, %v; want %v", b, err, tc.want)
			}
		})
	}
}
