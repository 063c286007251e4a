// Package logx makes overlayd's logger: zap's console format, whose every
// entry is one line whatever text a peer managed to get into it, and
// sampled per message so that a flood of one event cannot flood the log.
//
// Messages are meant to be fixed texts with the data in fields (which the
// console format writes as escaped JSON); where a message carries data
// anyway (Weave's formatted lines), its control characters are escaped
// here, so a newline in a nickname or a refusal text cannot forge a line.
package logx

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
	"unicode"

	"go.uber.org/zap"
	"go.uber.org/zap/buffer"
	"go.uber.org/zap/zapcore"
)

// Sampling: per message text and level, the first SampleFirst entries of
// each second are written, then every SampleThereafter-th.
const (
	SampleFirst      = 100
	SampleThereafter = 100
)

// New logs to w at level.
func New(w io.Writer, level zapcore.Level) *zap.Logger {
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	enc.EncodeLevel = zapcore.CapitalLevelEncoder
	core := zapcore.NewCore(oneLine{zapcore.NewConsoleEncoder(enc)}, zapcore.Lock(zapcore.AddSync(w)), level)
	return zap.New(zapcore.NewSamplerWithOptions(core, time.Second, SampleFirst, SampleThereafter),
		zap.ErrorOutput(zapcore.Lock(zapcore.AddSync(w))))
}

// Printf logs printf-style at lvl, for the cores' Infof and Warnf (Weave's
// formatted lines), sampled per format rather than per text: a format is
// one kind of event whatever its values, so a flood of one kind is cut
// like a flood of one fixed message, however its texts differ. The text is
// formatted only for the entries written.
func Printf(log *zap.Logger, lvl zapcore.Level) func(format string, args ...any) {
	return func(format string, args ...any) {
		if ce := log.Check(lvl, format); ce != nil {
			ce.Message = fmt.Sprintf(format, args...)
			ce.Write()
		}
	}
}

// oneLine escapes the control characters of each entry's message and
// stack (fields are escaped by the console format itself).
type oneLine struct{ zapcore.Encoder }

func (e oneLine) Clone() zapcore.Encoder { return oneLine{e.Encoder.Clone()} }

func (e oneLine) EncodeEntry(ent zapcore.Entry, fields []zapcore.Field) (*buffer.Buffer, error) {
	ent.Message = Escape(ent.Message)
	return e.Encoder.EncodeEntry(ent, fields)
}

// Escape writes the control characters of s (newlines, carriage returns,
// terminal escapes, and the Unicode line separators) as Go escapes;
// anything else is kept.
func Escape(s string) string {
	if strings.IndexFunc(s, needsEscape) < 0 {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if needsEscape(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		} else {
			b.WriteRune(r)
		}
	}
	return b.String()
}

func needsEscape(r rune) bool {
	return unicode.IsControl(r) || r == '\u2028' || r == '\u2029'
}
