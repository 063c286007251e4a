package handshake

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/overlayd/overlayd/proto"
)

var (
	r24 = netip.MustParsePrefix("172.16.16.0/24")
	r16 = netip.MustParsePrefix("10.32.0.0/16")
)

func TestCheck(t *testing.T) {
	us := Config{Name: 0x0a, UID: 1, Nickname: "us", Range: r24}
	for _, tc := range []struct {
		name    string
		hello   proto.Hello
		wantErr string
	}{
		{"same range", proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0x0b, UID: 2, Range: r24}, ""},
		{"no range on their side", proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0x0b, UID: 2}, ""},
		{"newer peer", proto.Hello{MinVersion: 1, MaxVersion: 9, Name: 0x0b, UID: 2, Range: r24}, ""},
		{"range differs", proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0x0b, UID: 2, Range: r16},
			"Incompatible IP allocation ranges (received: 10.32.0.0/16, ours: 172.16.16.0/24)"},
		{"our name", proto.Hello{MinVersion: 1, MaxVersion: 1, Name: 0x0a, UID: 3, Nickname: "them", Range: r24},
			`local "00:00:00:00:00:0a(us)" and remote "00:00:00:00:00:0a(them)" peer names collision`},
		{"too new", proto.Hello{MinVersion: 2, MaxVersion: 3, Name: 0x0b, UID: 2, Range: r24},
			"remote version range [2,3] is incompatible with ours [1,1]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, err := us.Check(&tc.hello)
			switch {
			case tc.wantErr == "" && (err != nil || v != 1):
				t.Errorf("got %d, %v", v, err)
			case tc.wantErr != "" && (err == nil || err.Error() != tc.wantErr):
				t.Errorf("got %v, want %q", err, tc.wantErr)
			}
		})
	}
}

// TestRangeRefusalOnBothSides checks that the refused side reports the same
// Weave text, seen from its own side.
func TestRangeRefusalOnBothSides(t *testing.T) {
	a := Config{Name: 1, UID: 1, Range: r24}
	b := Config{Name: 2, UID: 2, Range: r16}
	ah := a.Hello()
	_, err := b.Check(&ah)
	rej := b.Reject(err)
	if rej.Code != proto.RejectRange {
		t.Fatalf("code %d", rej.Code)
	}
	wire, perr := proto.ParseReject(proto.AppendReject(nil, &rej))
	if perr != nil {
		t.Fatal(perr)
	}
	got := a.FromReject(&wire)
	var re *RangeError
	if !errors.As(got, &re) || got.Error() != "Incompatible IP allocation ranges (received: 10.32.0.0/16, ours: 172.16.16.0/24)" {
		t.Errorf("dialler reports %v", got)
	}
	other := a.FromReject(&proto.Reject{Code: proto.RejectCollision, Message: "x"})
	if other.Error() != "refused by peer: x" || Permanent(other) {
		t.Errorf("got %v, permanent %v: a collision the peer reports may be forged", other, Permanent(other))
	}
	if ours := (&CollisionError{}); !Permanent(ours) {
		t.Error("a collision we found ourselves is permanent")
	}
	if Permanent(err) {
		t.Error("a range mismatch is not permanent: the peer may be restarted with the right range")
	}
}

// TestPasswordRefusals: each side of a password refusal names the side that
// lacks or mismatches it, and the reject carries nothing else.
func TestPasswordRefusals(t *testing.T) {
	us := Config{Name: 1, UID: 1, Nickname: "us", Range: r24}
	for _, tc := range []struct {
		ours, theirs PasswordProblem
	}{{WeLack, TheyLack}, {TheyLack, WeLack}, {Mismatch, Mismatch}} {
		rj := us.Reject(&PasswordError{Problem: tc.ours})
		if rj.Name != 0 || rj.Range.IsValid() || rj.Message != "" {
			t.Errorf("%v: reject tells %+v", tc.ours, rj)
		}
		wire, err := proto.ParseReject(proto.AppendReject(nil, &rj))
		if err != nil {
			t.Fatal(err)
		}
		var pe *PasswordError
		got := us.FromReject(&wire)
		if !errors.As(got, &pe) || pe.Problem != tc.theirs || Permanent(got) {
			t.Errorf("%v: the refused side reports %v", tc.ours, got)
		}
	}
	for p, want := range map[PasswordProblem]string{WeLack: "we have none", TheyLack: "the peer has none", Mismatch: "differs from ours"} {
		if msg := (&PasswordError{Problem: p}).Error(); !strings.Contains(msg, want) {
			t.Errorf("%v: %q", p, msg)
		}
	}
}
