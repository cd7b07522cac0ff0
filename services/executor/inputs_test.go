package executor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

func TestFileFailuresAreClassifiedByTheirCause(t *testing.T) {
	t.Parallel()
	refused := &comfy.HTTPError{Op: "upload image", StatusCode: 400}
	for name, tc := range map[string]struct {
		err       error
		permanent bool
	}{
		"upload refused by the node": {fmt.Errorf("fetch input image: %w", &fileError{err: fmt.Errorf("upload: %w", refused)}), false},
		"image gone from its server": {&fileError{err: &comfy.HTTPError{StatusCode: 404}, permanent: true}, true},
		"output lost by its node":    {fmt.Errorf("store: %w", &fileError{err: &comfy.HTTPError{Op: "view", StatusCode: 404}}), false},
		"prompt rejected":            {fmt.Errorf("run: %w", &comfy.RejectedError{Type: "invalid_prompt"}), true},
		"node unreachable":           {errors.New("dial tcp: connection refused"), false},
	} {
		if got := isPermanent(tc.err); got != tc.permanent {
			t.Errorf("%s: isPermanent = %v, want %v", name, got, tc.permanent)
		}
	}
	if !comfy.IsPermanent(refused) {
		t.Fatal("the comfy client no longer sees a 400 as permanent; this test lost its point")
	}
}

// TestStoredInputsAreReadWithinInputTimeout reads a stored input through a
// JetStream client whose default timeout has passed before any answer can come:
// the read must go by InputTimeout, not by that default.
func TestStoredInputsAreReadWithinInputTimeout(t *testing.T) {
	t.Parallel()
	_, nc, js := fleettest.Fleet(t, fleet.Settings{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	image := bytes.Repeat([]byte("\x89PNG pixels "), 20000)
	key := fleet.InputKey("job1", 0, "image")
	store, err := js.ObjectStore(ctx, fleet.ObjectInputs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.PutBytes(ctx, key, image); err != nil {
		t.Fatal(err)
	}
	hasty, err := jetstream.New(nc, jetstream.WithDefaultTimeout(time.Nanosecond))
	if err != nil {
		t.Fatal(err)
	}
	e := &executor{cfg: Config{InputTimeout: time.Minute}}
	if err := e.openInputs(ctx, hasty); err != nil {
		t.Fatal(err)
	}
	got, err := e.fetchInput(context.Background(), fleet.Input{Param: "image", Object: key})
	if err != nil || !bytes.Equal(got, image) {
		t.Errorf("fetchInput = %d bytes, %v; want the %d stored", len(got), err, len(image))
	}
}
