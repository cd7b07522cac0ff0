package comfydoor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// ObjectInfoStore is the object store where executors publish the /object_info answer
// of each node they drive, by node id.
const ObjectInfoStore = fleet.ObjectNodeInfo

// catalog is what the fleet's nodes can run, as the union of their /object_info
// answers: every class some node has; a class several nodes have keeps the
// definition of the first node by id, its option lists (model files, mostly) joined
// with the others'. It follows ObjectInfoStore and merges again, on the next read,
// after a node's answer changed.
type catalog struct {
	store func(ctx context.Context) (jetstream.ObjectStore, error)
	log   *slog.Logger

	mu sync.Mutex
	// digests are the nodes' answers as last announced, by node id.
	digests map[string]string
	// read are the answers read, by node id, with the digest they were read at.
	read map[string]nodeInfo
	// current is the union of read, nil when a node's answer changed since.
	current *fleetInfo
}

type nodeInfo struct {
	digest string
	raw    []byte
}

// fleetInfo is one union of the nodes' answers.
type fleetInfo struct {
	// body is GET /object_info's answer.
	body []byte
	// classes are the definitions by class, as json.dumps writes them.
	classes map[string][]byte
	// validator checks prompts against the union; nil while no node published
	// its answer, when the door leaves prompts to the fleet's own checks.
	validator *comfysim.Validator
	// inputFiles are the files LoadImage lists on some node.
	inputFiles map[string]bool
}

func newCatalog(store func(ctx context.Context) (jetstream.ObjectStore, error), log *slog.Logger) *catalog {
	return &catalog{store: store, log: log, digests: map[string]string{}, read: map[string]nodeInfo{}}
}

// missingStoreRetry is how often follow looks again for a store that does not exist
// yet (no executor has published an answer).
const missingStoreRetry = 2 * time.Second

// follow keeps the announced digests equal to the store's until ctx ends.
func (c *catalog) follow(ctx context.Context) {
	for ctx.Err() == nil {
		store, err := c.store(ctx)
		if err == nil {
			err = c.watch(ctx, store)
		}
		if ctx.Err() != nil {
			return
		}
		if !errors.Is(err, jetstream.ErrBucketNotFound) && !errors.Is(err, jetstream.ErrStreamNotFound) {
			c.log.Warn("follow the nodes' object_info", "err", err)
		}
		t := time.NewTimer(missingStoreRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (c *catalog) watch(ctx context.Context, store jetstream.ObjectStore) error {
	w, err := store.Watch(ctx)
	if err != nil {
		return fmt.Errorf("watch %s: %w", ObjectInfoStore, err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case info, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("watch %s: ended", ObjectInfoStore)
			}
			if info == nil {
				continue
			}
			c.mu.Lock()
			if info.Deleted {
				delete(c.digests, info.Name)
			} else {
				c.digests[info.Name] = info.Digest + "/" + info.NUID
			}
			c.current = nil
			c.mu.Unlock()
		}
	}
}

// get returns the union of the nodes' current answers, reading those that changed.
func (c *catalog) get(ctx context.Context) (*fleetInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.current != nil {
		return c.current, nil
	}
	var store jetstream.ObjectStore
	for node, digest := range c.digests {
		if c.read[node].digest == digest {
			continue
		}
		if store == nil {
			var err error
			if store, err = c.store(ctx); err != nil {
				return nil, fmt.Errorf("open %s: %w", ObjectInfoStore, err)
			}
		}
		raw, err := readObject(ctx, store, node)
		if errors.Is(err, jetstream.ErrObjectNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read the object_info of node %s: %w", node, err)
		}
		c.read[node] = nodeInfo{digest: digest, raw: raw}
	}
	for node := range c.read {
		if _, ok := c.digests[node]; !ok {
			delete(c.read, node)
		}
	}
	var answers [][]byte
	for _, node := range slices.Sorted(maps.Keys(c.read)) {
		answers = append(answers, c.read[node].raw)
	}
	fi, err := unite(answers)
	if err != nil {
		return nil, err
	}
	c.current = fi
	return fi, nil
}

// readObject reads the whole object name of store, as long as its size needs (the
// object store's GetBytes would cut a read whose ctx has no deadline at 5 s).
func readObject(ctx context.Context, store jetstream.ObjectStore, name string) ([]byte, error) {
	res, _, err := fleet.OpenObject(ctx, store, name)
	if err != nil {
		return nil, err
	}
	defer res.Close()
	return io.ReadAll(res)
}

// unite merges /object_info answers, the first one's definitions first.
func unite(answers [][]byte) (*fleetInfo, error) {
	fi := &fleetInfo{classes: map[string][]byte{}, inputFiles: map[string]bool{}}
	var order []string
	defs := map[string][]pyjson.Member{}
	for i, raw := range answers {
		classes, err := pyjson.ParseObject(raw)
		if err != nil {
			return nil, fmt.Errorf("object_info answer %d: %w", i, err)
		}
		for _, c := range classes {
			def, err := pyjson.ParseObject(c.Raw)
			if err != nil {
				return nil, fmt.Errorf("object_info class %s: %w", c.Key, err)
			}
			if have, ok := defs[c.Key]; ok {
				defs[c.Key] = joinOptions(have, def)
				continue
			}
			order = append(order, c.Key)
			defs[c.Key] = def
		}
	}
	all := make(object, 0, len(order))
	for _, name := range order {
		def := members(defs[name])
		b, err := pyjson.Marshal(def)
		if err != nil {
			return nil, fmt.Errorf("encode class %s: %w", name, err)
		}
		fi.classes[name] = b
		all = append(all, field{name, json.RawMessage(b)})
	}
	body, err := pyjson.Marshal(all)
	if err != nil {
		return nil, fmt.Errorf("encode object_info: %w", err)
	}
	fi.body = body
	if len(answers) == 0 {
		return fi, nil
	}
	if fi.validator, err = comfysim.NewValidator(body); err != nil {
		return nil, err
	}
	if files, _, ok := comboOptions(inputSpec(defs["LoadImage"], "image")); ok {
		for _, f := range files {
			fi.inputFiles[f] = true
		}
	}
	return fi, nil
}

// inputSpec returns the spec of a class's input called name, required or optional.
func inputSpec(def []pyjson.Member, name string) json.RawMessage {
	inputs, _ := pyjson.Lookup(def, "input")
	cats, _ := pyjson.ParseObject(inputs)
	for _, cat := range cats {
		specs, _ := pyjson.ParseObject(cat.Raw)
		if spec, ok := pyjson.Lookup(specs, name); ok {
			return spec
		}
	}
	return nil
}

// joinOptions returns def with the options of its combo inputs joined with those
// other lists for the same inputs: a checkpoint one node has and another lacks is
// offered.
func joinOptions(def, other []pyjson.Member) []pyjson.Member {
	inputs, ok := pyjson.Lookup(def, "input")
	if !ok {
		return def
	}
	cats, err := pyjson.ParseObject(inputs)
	if err != nil {
		return def
	}
	changed := false
	for ci, cat := range cats {
		specs, err := pyjson.ParseObject(cat.Raw)
		if err != nil {
			continue
		}
		for si, s := range specs {
			mine, form, ok := comboOptions(s.Raw)
			if !ok {
				continue
			}
			theirs, _, ok := comboOptions(inputSpec(other, s.Key))
			if !ok {
				continue
			}
			joined := union(mine, theirs)
			if len(joined) == len(mine) {
				continue
			}
			if raw, err := withOptions(s.Raw, form, joined); err == nil {
				specs[si].Raw, changed = raw, true
			}
		}
		if b, err := json.Marshal(members(specs)); err == nil {
			cats[ci].Raw = b
		}
	}
	if !changed {
		return def
	}
	b, err := json.Marshal(members(cats))
	if err != nil {
		return def
	}
	out := slices.Clone(def)
	for i := range out {
		if out[i].Key == "input" {
			out[i].Raw = b
		}
	}
	return out
}

// Forms of a combo input's spec.
const (
	// comboList is [[option, …], {…}].
	comboList = iota
	// comboTyped is ["COMBO", {"options": [option, …], …}], ComfyUI's newer form.
	comboTyped
)

// comboOptions returns the options of a combo input's spec and its form.
func comboOptions(spec json.RawMessage) (options []string, form int, ok bool) {
	var parts []json.RawMessage
	if json.Unmarshal(spec, &parts) != nil || len(parts) == 0 {
		return nil, 0, false
	}
	if json.Unmarshal(parts[0], &options) == nil {
		return options, comboList, true
	}
	var typ string
	if json.Unmarshal(parts[0], &typ) != nil || typ != "COMBO" || len(parts) < 2 {
		return nil, 0, false
	}
	var opts struct {
		Options []string `json:"options"`
	}
	if json.Unmarshal(parts[1], &opts) != nil || opts.Options == nil {
		return nil, 0, false
	}
	return opts.Options, comboTyped, true
}

// withOptions returns spec with options in place of its own.
func withOptions(spec json.RawMessage, form int, options []string) (json.RawMessage, error) {
	var parts []json.RawMessage
	if err := json.Unmarshal(spec, &parts); err != nil {
		return nil, err
	}
	list, err := json.Marshal(options)
	if err != nil {
		return nil, err
	}
	switch form {
	case comboList:
		parts[0] = list
	case comboTyped:
		opts, err := pyjson.ParseObject(parts[1])
		if err != nil {
			return nil, err
		}
		for i := range opts {
			if opts[i].Key == "options" {
				opts[i].Raw = list
			}
		}
		if parts[1], err = json.Marshal(members(opts)); err != nil {
			return nil, err
		}
	}
	return json.Marshal(parts)
}

// union returns a's options, then those of b that a lacks; sorted when both were, as
// ComfyUI sorts a model folder's listing.
func union(a, b []string) []string {
	out := slices.Clone(a)
	for _, s := range b {
		if !slices.Contains(a, s) {
			out = append(out, s)
		}
	}
	if len(out) > len(a) && slices.IsSorted(a) && slices.IsSorted(b) {
		slices.Sort(out)
	}
	return out
}
