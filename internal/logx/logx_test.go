package logx

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// TestOneLinePerEntry: a message and fields carrying newlines, carriage
// returns and a terminal escape each make exactly one line, with those
// characters escaped.
func TestOneLinePerEntry(t *testing.T) {
	var out bytes.Buffer
	log := New(&out, zapcore.DebugLevel)
	forged := "evil\n2026-12-05T00:00:00.000Z\tINFO\tconnection established\r\x1b[2K"
	log.Warn(forged, zap.String("nick", forged), zap.Error(errors.New(forged)))
	log.Info("next")
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 2 || !strings.HasSuffix(lines[1], "next") {
		t.Fatalf("%d lines:\n%s", len(lines), out.String())
	}
	if strings.ContainsAny(lines[0], "\r\x1b") || !strings.Contains(lines[0], `evil\n2026`) || !strings.Contains(lines[0], `\x1b[2K`) {
		t.Errorf("the line is not escaped: %q", lines[0])
	}
}

// TestSampledPerMessage: a flood of one message is cut to the sampler's
// rate within a second; another message still gets through.
func TestSampledPerMessage(t *testing.T) {
	var out bytes.Buffer
	log := New(&out, zapcore.InfoLevel)
	for range 10 * SampleFirst {
		log.Warn("junk datagram", zap.Int("n", 1))
	}
	log.Warn("something else")
	got := strings.Count(out.String(), "junk datagram")
	if want := SampleFirst + (10*SampleFirst-SampleFirst)/SampleThereafter; got != want {
		t.Errorf("%d lines of the flood written, want %d", got, want)
	}
	if !strings.Contains(out.String(), "something else") {
		t.Error("another message was dropped with the flood")
	}
}

// TestPrintfSampledPerFormat: a flood of one format with a different
// value each time is cut like one message; another format still gets
// through, and the lines written carry the formatted text.
func TestPrintfSampledPerFormat(t *testing.T) {
	var out bytes.Buffer
	log := New(&out, zapcore.InfoLevel)
	infof := Printf(log, zapcore.InfoLevel)
	for i := range 10 * SampleFirst {
		infof("ring from %v: %d entries skipped", "peer", i)
	}
	infof("other %s", "event")
	Printf(log, zapcore.DebugLevel)("below the level %d", 1)
	got := strings.Count(out.String(), "entries skipped")
	if want := SampleFirst + (10*SampleFirst-SampleFirst)/SampleThereafter; got != want {
		t.Errorf("%d lines of the flood written, want %d", got, want)
	}
	for _, want := range []string{"ring from peer: 0 entries skipped", "ring from peer: 99 entries skipped", "other event"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("no line %q in\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "%") || strings.Contains(out.String(), "below the level") {
		t.Errorf("a format or an entry below the level written:\n%s", out.String())
	}
}

func TestEscape(t *testing.T) {
	for in, want := range map[string]string{
		"plain text: 10.0.0.1/8 (ok)": "plain text: 10.0.0.1/8 (ok)",
		"a\nb":                        `a\nb`,
		"tab\there":                   `tab\there`,
		"ls\u2028x":                   `ls\u2028x`,
		"bad\xff\nbyte":               "bad\ufffd\\nbyte",
		"é, ü and 中文":                 "é, ü and 中文",
	} {
		if got := Escape(in); got != want {
			t.Errorf("Escape(%q) = %q, want %q", in, got, want)
		}
	}
}
