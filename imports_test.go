package overlayd_test

// Meta tests: the repository's layering and conventions, checked on every
// test run. The rules are DESIGN.md §8 and STYLE.md §3; changing them here
// changes the design, so update those documents in the same change.

import (
	"bytes"
	"go/ast"
	"go/format"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/overlayd/overlayd"

// pure packages may import only the standard library (minus bannedInPure)
// and the module packages listed.
var pure = map[string][]string{
	"proto":               nil,
	"peering/handshake":   {"proto"},
	"peering/link":        {"proto", "peering/handshake", "peering/secure"},
	"peering/secure":      {"proto"},
	"peering/topology":    {"proto"},
	"peering/gossip":      {"proto"},
	"peering/routes":      {"internal/ipv4"},
	"ipalloc/ring":        {"proto", "internal/ipv4"},
	"ipalloc/paxos":       {"proto"},
	"ipalloc":             {"proto", "ipalloc/ring", "ipalloc/paxos", "internal/ipv4"},
	"names":               {"proto"},
	"internal/hostnet":    nil,
	"internal/ipv4":       nil,
	"internal/containers": nil,
}

// pureThirdParty lists, per pure package, the third-party packages it may
// import: computation only (cryptography), no I/O, clocks or globals.
var pureThirdParty = map[string][]string{
	"peering/secure": {"github.com/flynn/noise", "golang.org/x/crypto/argon2", "golang.org/x/crypto/curve25519",
		"golang.zx2c4.com/wireguard/replay"},
}

// bannedInPure gives a core I/O, time, concurrency or a process-global
// state; cores take those as inputs instead.
var bannedInPure = []string{"net", "os", "syscall", "time", "log", "log/slog", "sync", "sync/atomic", "unsafe", "math/rand", "crypto/rand"}

// allowed lists, for the other packages, the module packages each may
// import (most specific path first; "*" means any).
var allowed = []struct {
	pkg  string
	deps []string
}{
	{"tun", nil},
	{"peering/conn", nil},
	{"peering/wgplane", []string{"peering", "peering/conn", "peering/secure"}},
	{"peering/topology/topotest", []string{"proto", "peering/topology", "internal/simnet"}},
	{"ipalloc/ipalloctest", []string{"proto", "ipalloc", "ipalloc/ring", "internal/ipv4", "internal/simnet"}},
	{"ipalloc/allocsrv", []string{"proto", "ipalloc", "ipalloc/ring", "internal/atomicfile", "internal/coreloop", "internal/ipv4", "internal/logx"}},
	{"names/namestest", []string{"proto", "names", "internal/simnet"}},
	{"internal/simnet", []string{"proto"}},
	{"names/namesrv", []string{"proto", "names", "internal/atomicfile", "internal/coreloop", "internal/logx"}},
	{"internal/coreloop", nil},
	{"names/resolver", []string{"names", "internal/ratelimit"}},
	{"internal/atomicfile", nil},
	{"internal/attach", []string{"internal/netconf"}},
	{"internal/dockerplugin", []string{"internal/api", "internal/atomicfile", "internal/containers", "internal/ipv4", "internal/pluginstate", "internal/serve"}},
	{"internal/firewall", nil},
	{"internal/pluginstate", nil},
	{"internal/ratelimit", nil},
	{"peering", []string{"proto", "tun", "internal/ratelimit", "peering/conn", "peering/gossip", "peering/handshake", "peering/link", "peering/routes", "peering/secure", "peering/topology"}},
	{"internal/netconf", []string{"internal/hostnet"}},
	{"internal/buildinfo", nil},
	{"internal/metrics", []string{"internal/serve"}},
	{"internal/serve", nil},
	{"internal/api", []string{"proto", "internal/serve"}},
	{"internal/lab", []string{"internal/api"}},
	{"cmd/overlayctl", []string{"internal/api", "internal/buildinfo", "proto"}},
	{"internal/daemon", []string{"*"}},
	// cmd/overlayd only wires: flags into daemon.Config, then New and Run.
	{"cmd/overlayd", []string{"internal/daemon", "internal/api", "internal/buildinfo", "internal/logx", "internal/dockerplugin",
		"ipalloc", "names", "peering", "proto", "tun"}},
	{"fuzz", []string{"*"}},
	{"", nil}, // the module root holds only these tests
}

type goFile struct {
	pkg  string // directory relative to the module root
	path string
	ast  *ast.File
	src  []byte
}

func sources(t *testing.T, withTests bool) []goFile {
	t.Helper()
	var files []goFile
	fset := token.NewFileSet()
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") && path != "." || d.Name() == "testdata" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || (!withTests && strings.HasSuffix(path, "_test.go")) {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		f, err := parser.ParseFile(fset, path, src, parser.ParseComments)
		if err != nil {
			return err
		}
		files = append(files, goFile{pkg: filepath.ToSlash(filepath.Dir(path)), path: path, ast: f, src: src})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range files {
		if files[i].pkg == "." {
			files[i].pkg = ""
		}
	}
	return files
}

func TestImportRules(t *testing.T) {
	for _, f := range sources(t, false) {
		for _, imp := range f.ast.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			internal, isModule := strings.CutPrefix(path, module+"/")
			if deps, ok := pure[f.pkg]; ok {
				switch {
				case slices.Contains(bannedInPure, path):
					t.Errorf("%s: pure package %s imports %s", f.path, f.pkg, path)
				case isModule && !slices.Contains(deps, internal):
					t.Errorf("%s: pure package %s imports %s; allowed: %v", f.path, f.pkg, internal, deps)
				case !isModule && strings.Contains(strings.Split(path, "/")[0], ".") && !slices.Contains(pureThirdParty[f.pkg], path):
					t.Errorf("%s: pure package %s imports third-party %s", f.path, f.pkg, path)
				}
				continue
			}
			if !isModule {
				continue
			}
			rule := -1
			for i, r := range allowed {
				if f.pkg == r.pkg || strings.HasPrefix(f.pkg, r.pkg+"/") && r.pkg != "" {
					rule = i
					break
				}
			}
			if rule < 0 {
				t.Errorf("%s: package %s has no import rule: add it to imports_test.go and DESIGN.md", f.path, f.pkg)
				continue
			}
			deps := allowed[rule].deps
			if !slices.Contains(deps, "*") && !slices.Contains(deps, internal) {
				t.Errorf("%s: %s may not import %s (rule for %q allows %v)", f.path, f.pkg, internal, allowed[rule].pkg, deps)
			}
		}
		if _, ok := pure[f.pkg]; ok {
			ast.Inspect(f.ast, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				if sel, ok := call.Fun.(*ast.SelectorExpr); ok {
					if id, ok := sel.X.(*ast.Ident); ok && id.Name == "rand" {
						t.Errorf("%s: pure package calls rand.%s: take a *rand.Rand in Config", f.path, sel.Sel.Name)
					}
				}
				return true
			})
		}
	}
}

func TestPackageComments(t *testing.T) {
	documented := map[string]bool{}
	seen := map[string]bool{}
	for _, f := range sources(t, false) {
		seen[f.pkg] = true
		if f.ast.Doc != nil && strings.HasPrefix(f.ast.Doc.Text(), "Package "+f.ast.Name.Name) ||
			f.ast.Doc != nil && f.ast.Name.Name == "main" && strings.HasPrefix(f.ast.Doc.Text(), "Command ") {
			documented[f.pkg] = true
		}
	}
	for pkg := range seen {
		if !documented[pkg] && pkg != "" {
			t.Errorf("package %s has no package comment", pkg)
		}
	}
}

func TestGofmt(t *testing.T) {
	for _, f := range sources(t, true) {
		want, err := format.Source(f.src)
		if err != nil {
			t.Errorf("%s: %v", f.path, err)
			continue
		}
		if !bytes.Equal(want, f.src) {
			t.Errorf("%s is not gofmt-formatted", f.path)
		}
	}
}
