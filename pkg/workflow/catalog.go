package workflow

import (
	"fmt"
	"io/fs"
	"maps"
	"path"
	"slices"
	"strings"
	"sync"
)

// Catalog is the set of templates a fleet offers, by name. It is safe for concurrent
// use: Store.Follow keeps it equal to the templates bucket while requests read it.
type Catalog struct {
	mu        sync.RWMutex
	templates map[string]version
}

// version is a template and the bucket revision it came from (0 when it did not come
// from the bucket).
type version struct {
	t   *Template
	rev uint64
}

// NewCatalog returns an empty catalog.
func NewCatalog() *Catalog {
	return &Catalog{templates: map[string]version{}}
}

// Load reads every *.json template in the root of fsys and checks each one.
func Load(fsys fs.FS) (*Catalog, error) {
	ts, err := readDir(fsys)
	if err != nil {
		return nil, err
	}
	c := NewCatalog()
	for _, t := range ts {
		c.templates[t.Name] = version{t: t}
	}
	return c, nil
}

// readDir parses every *.json template in the root of fsys, each of which must be
// named after its file.
func readDir(fsys fs.FS) ([]*Template, error) {
	names, err := fs.Glob(fsys, "*.json")
	if err != nil {
		return nil, fmt.Errorf("list templates: %w", err)
	}
	out := make([]*Template, 0, len(names))
	for _, name := range names {
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, fmt.Errorf("read template %s: %w", name, err)
		}
		t, err := Parse(b)
		if err != nil {
			return nil, fmt.Errorf("template %s: %w", name, err)
		}
		if want := strings.TrimSuffix(path.Base(name), ".json"); t.Name != want {
			return nil, fmt.Errorf("template %s: name %q does not match its file name", name, t.Name)
		}
		out = append(out, t)
	}
	return out, nil
}

// Get returns the template called name. The caller must not change it.
func (c *Catalog) Get(name string) (*Template, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	v, ok := c.templates[name]
	return v.t, ok
}

// List returns the templates ordered by name.
func (c *Catalog) List() []*Template {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]*Template, 0, len(c.templates))
	for _, name := range slices.Sorted(maps.Keys(c.templates)) {
		out = append(out, c.templates[name].t)
	}
	return out
}

// Names returns the template names in order.
func (c *Catalog) Names() []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return slices.Sorted(maps.Keys(c.templates))
}

// Set records t as the bucket's revision rev of its name, unless the catalog already
// holds a later revision: a writer sees its own write at once, and the watch that
// delivers it later changes nothing.
func (c *Catalog) Set(t *Template, rev uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cur, ok := c.templates[t.Name]; ok && cur.rev > rev {
		return
	}
	c.templates[t.Name] = version{t: t, rev: rev}
}

// remove forgets name, deleted from the bucket at revision rev.
func (c *Catalog) remove(name string, rev uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cur, ok := c.templates[name]; ok && cur.rev <= rev {
		delete(c.templates, name)
	}
}

// replace makes the catalog hold exactly templates.
func (c *Catalog) replace(templates map[string]version) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.templates = templates
}
