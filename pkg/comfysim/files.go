package comfysim

import (
	"fmt"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The folders ComfyUI serves files from.
const (
	dirOutput = "output"
	dirInput  = "input"
	dirTemp   = "temp"
)

// storedFile is one file of the simulated disk.
type storedFile struct {
	data    []byte
	modTime time.Time
}

// fileStore is the simulated disk: the input, output and temp folders.
// It outlives Kill and Restart, as a real disk does; only temp is wiped
// when the server starts again.
type fileStore struct {
	mu       sync.Mutex
	files    map[string]*storedFile
	counters map[string]int
}

func newFileStore() *fileStore {
	return &fileStore{files: map[string]*storedFile{}, counters: map[string]int{}}
}

func fileKey(dir, subfolder, name string) string {
	return dir + "/" + path.Join(subfolder, name)
}

// cleanSubfolder rejects subfolders that leave their folder, as the real
// server's commonpath check does.
func cleanSubfolder(sub string) (string, error) {
	if sub == "" {
		return "", nil
	}
	if strings.HasPrefix(sub, "/") {
		return "", fmt.Errorf("subfolder %q is absolute", sub)
	}
	c := path.Clean(sub)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("subfolder %q leaves its folder", sub)
	}
	if c == "." {
		return "", nil
	}
	return c, nil
}

func (fs *fileStore) put(dir, subfolder, name string, data []byte) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.files[fileKey(dir, subfolder, name)] = &storedFile{data: data, modTime: time.Now()}
}

func (fs *fileStore) get(dir, subfolder, name string) (*storedFile, bool) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.files[fileKey(dir, subfolder, name)]
	return f, ok
}

// list returns the names of the files directly inside dir/subfolder.
func (fs *fileStore) list(dir, subfolder string) []string {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.listLocked(dir, subfolder)
}

func (fs *fileStore) listLocked(dir, subfolder string) []string {
	prefix := fileKey(dir, subfolder, "")
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	var out []string
	for k := range fs.files {
		if rest, ok := strings.CutPrefix(k, prefix); ok && !strings.Contains(rest, "/") {
			out = append(out, rest)
		}
	}
	sort.Strings(out)
	return out
}

// clear empties a folder.
func (fs *fileStore) clear(dir string) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	for k := range fs.files {
		if strings.HasPrefix(k, dir+"/") {
			delete(fs.files, k)
		}
	}
	for k := range fs.counters {
		if strings.HasPrefix(k, dir+"/") {
			delete(fs.counters, k)
		}
	}
}

// counterStyle selects how existing names are matched when numbering a
// new file: ComfyUI's "prefix_00001_.png" or VideoHelperSuite's
// "prefix_00001.mp4".
type counterStyle int

const (
	comfyCounter counterStyle = iota
	vhsCounter
)

// reserve returns the first of n consecutive file numbers for a prefix,
// one past the highest already used, the way ComfyUI scans its output
// folder.
func (fs *fileStore) reserve(style counterStyle, dir, subfolder, prefix string, n int) int {
	key := fmt.Sprintf("%s/%d/%s", fileKey(dir, subfolder, ""), style, strings.ToLower(prefix))
	fs.mu.Lock()
	defer fs.mu.Unlock()
	next, ok := fs.counters[key]
	if !ok {
		next = 1 + maxCounter(style, fs.listLocked(dir, subfolder), prefix)
	}
	fs.counters[key] = next + n
	return next
}

func maxCounter(style counterStyle, names []string, prefix string) int {
	best := 0
	switch style {
	case vhsCounter:
		re := regexp.MustCompile(`(?i)^` + regexp.QuoteMeta(prefix) + `_(\d+)\D*\..+$`)
		for _, n := range names {
			if m := re.FindStringSubmatch(n); m != nil {
				if v, err := strconv.Atoi(m[1]); err == nil && v > best {
					best = v
				}
			}
		}
	default:
		for _, n := range names {
			if len(n) <= len(prefix) || !strings.EqualFold(n[:len(prefix)], prefix) || n[len(prefix)] != '_' {
				continue
			}
			digits, _, _ := strings.Cut(n[len(prefix)+1:], "_")
			if v, err := strconv.Atoi(digits); err == nil && v > best {
				best = v
			}
		}
	}
	return best
}

// annotatedPath resolves a LoadImage name such as "sub/a.png [output]"
// to its folder, subfolder and file name.
func annotatedPath(name string) (dir, subfolder, base string) {
	dir = dirInput
	for _, d := range []string{dirOutput, dirInput, dirTemp} {
		if n, ok := strings.CutSuffix(name, " ["+d+"]"); ok {
			dir, name = d, n
			break
		}
	}
	subfolder, base = path.Split(name)
	return dir, strings.TrimSuffix(subfolder, "/"), base
}

// exists reports whether a LoadImage name refers to a stored file.
func (fs *fileStore) exists(annotated string) bool {
	dir, sub, base := annotatedPath(annotated)
	if base == "" {
		return false
	}
	_, ok := fs.get(dir, sub, base)
	return ok
}

// extOf returns the lower-case extension of a file name.
func extOf(name string) string {
	return strings.ToLower(path.Ext(name))
}

// contentTypes are the types /view answers with, as Python's mimetypes
// guesses them.
var contentTypes = map[string]string{
	".png":  "image/png",
	".jpg":  "image/jpeg",
	".jpeg": "image/jpeg",
	".webp": "image/webp",
	".gif":  "image/gif",
	".bmp":  "image/bmp",
	".mp4":  "video/mp4",
	".webm": "video/webm",
	".mov":  "video/quicktime",
	".wav":  "audio/x-wav",
	".flac": "audio/flac",
	".mp3":  "audio/mpeg",
	".ogg":  "audio/ogg",
	".json": "application/json",
	".txt":  "text/plain",
}

func contentTypeOf(name string) string {
	if ct, ok := contentTypes[extOf(name)]; ok {
		return ct
	}
	return "application/octet-stream"
}
