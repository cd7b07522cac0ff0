package comfydoor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// record is what the door keeps of a prompt, in fleet.BucketComfyPrompts under
// "p.<tenant>.<promptKey>": the job that runs it and what ComfyUI shows of it in the
// queue and the history.
type record struct {
	PromptID string `json:"prompt_id"`
	Job      string `json:"job"`
	ClientID string `json:"client_id,omitempty"`
	// Number is the number the client gave, if it gave one; otherwise the prompt's
	// number is the record's revision, negative for a prompt sent to the front.
	Number *float64 `json:"number,omitempty"`
	Front  bool     `json:"front,omitempty"`
	// Extra is extra_data as ComfyUI keeps it: the client's, client_id last.
	Extra json.RawMessage `json:"extra_data"`
	// Outputs are the output nodes that run (ComfyUI's outputs_to_execute).
	Outputs []string `json:"outputs"`
	// Classes are the graph's class types by node id.
	Classes map[string]string `json:"classes,omitempty"`
	Created time.Time         `json:"created"`

	rev uint64
}

// number is the prompt's number as ComfyUI writes it: the client's as a float, else
// an integer.
func (r *record) number() any {
	if r.Number != nil {
		return pyjson.Float(*r.Number)
	}
	return int64(r.order())
}

// order is the prompt's number, by which ComfyUI orders its queue.
func (r *record) order() float64 {
	if r.Number != nil {
		return *r.Number
	}
	if r.Front {
		return -float64(r.rev)
	}
	return float64(r.rev)
}

// promptNamespace derives a prompt's key from its id, which may be any string.
var promptNamespace = uuid.MustParse("8a3c2f71-61d4-4c1b-9f0e-2b7d5e9c4a10")

// promptKey is the token that stands for a prompt id in keys.
func promptKey(id string) string { return uuid.NewSHA1(promptNamespace, []byte(id)).String() }

func recordKey(tenant, promptID string) string { return "p." + tenant + "." + promptKey(promptID) }

func markerKey(tenant, promptID string) string { return "q." + tenant + "." + promptKey(promptID) }

// prompts keeps the records of prompts and the markers of those that may still wait
// or run ("q.<tenant>.<promptKey>", holding the client id): /queue reads the markers
// of a tenant, not every record, and drops the markers of prompts it finds ended.
type prompts struct {
	kv jetstream.KeyValue
}

// create stores a new record and returns it with its revision; a prompt recorded
// before is returned as it was stored, with created false.
func (p *prompts) create(ctx context.Context, tenant string, r *record) (_ *record, created bool, err error) {
	b, err := json.Marshal(r)
	if err != nil {
		return nil, false, fmt.Errorf("encode prompt %s: %w", r.PromptID, err)
	}
	rev, err := p.kv.Create(ctx, recordKey(tenant, r.PromptID), b)
	if errors.Is(err, jetstream.ErrKeyExists) {
		old, err := p.get(ctx, tenant, r.PromptID)
		if err != nil {
			return nil, false, err
		}
		if old == nil {
			return nil, false, fmt.Errorf("prompt %s: recorded and gone", r.PromptID)
		}
		return old, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("record prompt %s: %w", r.PromptID, err)
	}
	stored := *r
	stored.rev = rev
	return &stored, true, nil
}

// get returns the tenant's record of a prompt, nil if there is none.
func (p *prompts) get(ctx context.Context, tenant, promptID string) (*record, error) {
	e, err := p.kv.Get(ctx, recordKey(tenant, promptID))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read prompt %s: %w", promptID, err)
	}
	return decodeRecord(e)
}

func decodeRecord(e jetstream.KeyValueEntry) (*record, error) {
	var r record
	if err := json.Unmarshal(e.Value(), &r); err != nil {
		return nil, fmt.Errorf("decode prompt record %s: %w", e.Key(), err)
	}
	r.rev = e.Revision()
	return &r, nil
}

// mark notes that the prompt may wait or run.
func (p *prompts) mark(ctx context.Context, tenant string, r *record) error {
	if _, err := p.kv.Put(ctx, markerKey(tenant, r.PromptID), []byte(r.ClientID)); err != nil {
		return fmt.Errorf("mark prompt %s queued: %w", r.PromptID, err)
	}
	return nil
}

// unmark drops the marker of a prompt that ended.
func (p *prompts) unmark(ctx context.Context, tenant, promptID string) error {
	if err := p.kv.Purge(ctx, markerKey(tenant, promptID)); err != nil {
		return fmt.Errorf("unmark prompt %s: %w", promptID, err)
	}
	return nil
}

// marker is a prompt that may still wait or run.
type marker struct {
	key      string
	clientID string
}

// markers returns the tenant's markers, oldest first.
func (p *prompts) markers(ctx context.Context, tenant string) ([]marker, error) {
	var out []marker
	err := p.scan(ctx, "q."+tenant+".*", func(e jetstream.KeyValueEntry) error {
		out = append(out, marker{key: e.Key(), clientID: string(e.Value())})
		return nil
	})
	return out, err
}

// records returns the tenant's records, oldest first.
func (p *prompts) records(ctx context.Context, tenant string) ([]*record, error) {
	var out []*record
	err := p.scan(ctx, "p."+tenant+".*", func(e jetstream.KeyValueEntry) error {
		r, err := decodeRecord(e)
		if err == nil {
			out = append(out, r)
		}
		return err
	})
	return out, err
}

// recordOf returns the record a marker stands for, nil if it is gone.
func (p *prompts) recordOf(ctx context.Context, m marker) (*record, error) {
	e, err := p.kv.Get(ctx, "p."+m.key[len("q."):])
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read prompt of %s: %w", m.key, err)
	}
	return decodeRecord(e)
}

// scan calls f with the current entry of every key matching filter, in revision order.
func (p *prompts) scan(ctx context.Context, filter string, f func(jetstream.KeyValueEntry) error) error {
	w, err := p.kv.Watch(ctx, filter, jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("list %s: %w", filter, err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("list %s: the watch ended", filter)
			}
			if e == nil {
				return nil
			}
			if err := f(e); err != nil {
				return err
			}
		case <-ctx.Done():
			return fmt.Errorf("list %s: %w", filter, ctx.Err())
		}
	}
}

// openPrompts binds to the prompts bucket, which fleet.Ensure creates.
func openPrompts(ctx context.Context, js jetstream.JetStream) (*prompts, error) {
	kv, err := js.KeyValue(ctx, fleet.BucketComfyPrompts)
	if err != nil {
		return nil, fmt.Errorf("comfydoor: open bucket %s: %w", fleet.BucketComfyPrompts, err)
	}
	return &prompts{kv: kv}, nil
}
