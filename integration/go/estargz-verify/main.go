// Command estargz-verify reads an eStargz blob with stargz-snapshotter's own library: it checks
// the TOC against the expected digest, every chunk against its TOC digest, and prints each
// regular file's path and sha256, so a test can compare Shoal's output with what
// stargz-snapshotter would present.
package main

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: estargz-verify BLOB TOC_DIGEST")
		os.Exit(2)
	}
	if err := run(os.Args[1], digest.Digest(os.Args[2])); err != nil {
		fmt.Fprintln(os.Stderr, "estargz-verify:", err)
		os.Exit(1)
	}
}

func run(path string, toc digest.Digest) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, info.Size()))
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	verifier, err := r.VerifyTOC(toc)
	if err != nil {
		return fmt.Errorf("verify toc: %w", err)
	}
	root, ok := r.Lookup("")
	if !ok {
		return fmt.Errorf("no root entry")
	}
	var lines []string
	var walk func(dir string, e *estargz.TOCEntry) error
	walk = func(dir string, e *estargz.TOCEntry) error {
		var werr error
		e.ForeachChild(func(base string, child *estargz.TOCEntry) bool {
			name := base
			if dir != "" {
				name = dir + "/" + base
			}
			switch child.Type {
			case "dir":
				werr = walk(name, child)
			case "reg":
				var sum string
				// A hardlink shares its target's entry: read through the entry's own name.
				sum, werr = fileSum(r, verifier, child.Name, child)
				lines = append(lines, "/"+name+" "+sum)
			}
			return werr == nil
		})
		return werr
	}
	if err := walk("", root); err != nil {
		return err
	}
	sort.Strings(lines)
	for _, l := range lines {
		fmt.Println(l)
	}
	return nil
}

func fileSum(r *estargz.Reader, verifier estargz.TOCEntryVerifier, name string, e *estargz.TOCEntry) (string, error) {
	ra, err := r.OpenFile(name)
	if err != nil {
		return "", fmt.Errorf("open %s: %w", name, err)
	}
	for off := int64(0); off < e.Size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok {
			return "", fmt.Errorf("%s: no chunk at %d", name, off)
		}
		v, err := verifier.Verifier(ce)
		if err != nil {
			return "", fmt.Errorf("%s: chunk verifier at %d: %w", name, off, err)
		}
		if _, err := io.Copy(v, io.NewSectionReader(ra, ce.ChunkOffset, ce.ChunkSize)); err != nil {
			return "", fmt.Errorf("%s: read chunk at %d: %w", name, off, err)
		}
		if !v.Verified() {
			return "", fmt.Errorf("%s: chunk at %d does not match its digest", name, off)
		}
		off = ce.ChunkOffset + ce.ChunkSize
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(ra, 0, e.Size)); err != nil {
		return "", fmt.Errorf("read %s: %w", name, err)
	}
	return fmt.Sprintf("%x", h.Sum(nil)), nil
}
