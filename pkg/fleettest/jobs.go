package fleettest

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// JobPieces counts what the fleet keeps of job id, by place: "commands" (its commit
// and retries waiting for the router), "payloads", "expiry" (its expiry schedule),
// "events", "deadletters", "record", "state", "inputs" and "outputs" (files whose
// names start with "<id>/"). A deleted or expired job has 0 of each.
func JobPieces(t testing.TB, js jetstream.JetStream, id string) map[string]int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Files are counted from the object store's stream, without a consumer: an
	// object store's List does not end when the age limit removes objects meanwhile.
	files := func(bucket string) int {
		t.Helper()
		st, err := js.Stream(ctx, "OBJ_"+bucket)
		if err != nil {
			t.Fatalf("open the stream of %s: %v", bucket, err)
		}
		meta := "$O." + bucket + ".M."
		info, err := st.Info(ctx, jetstream.WithSubjectFilter(meta+">"))
		if err != nil {
			t.Fatalf("list the objects of %s: %v", bucket, err)
		}
		n := 0
		for subject := range info.State.Subjects {
			name, err := base64.URLEncoding.DecodeString(strings.TrimPrefix(subject, meta))
			if err != nil || !strings.HasPrefix(string(name), id+"/") {
				continue
			}
			msg, err := st.GetLastMsgForSubject(ctx, subject)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				continue
			}
			if err != nil {
				t.Fatalf("read the object %s of %s: %v", name, bucket, err)
			}
			var obj jetstream.ObjectInfo
			if err := json.Unmarshal(msg.Data, &obj); err != nil {
				t.Fatalf("decode the object %s of %s: %v", name, bucket, err)
			}
			if !obj.Deleted {
				n++
			}
		}
		return n
	}
	states, err := js.KeyValue(ctx, fleet.BucketJobState)
	if err != nil {
		t.Fatalf("open bucket %s: %v", fleet.BucketJobState, err)
	}
	state := 0
	if _, err := states.Get(ctx, id); err == nil {
		state = 1
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("read the state of %s: %v", id, err)
	}
	return map[string]int{
		"commands":    Count(t, js, fleet.StreamSubmit, fleet.SubmitFilters(id)...),
		"payloads":    Count(t, js, fleet.StreamScenes, fleet.ScenePayloadsFilter(id)),
		"expiry":      Count(t, js, fleet.StreamExpiry, fleet.ExpiryScheduleSubject(id)),
		"events":      Count(t, js, fleet.StreamEvents, fleet.JobEventsFilter(id)...),
		"deadletters": Count(t, js, "KV_"+fleet.BucketDeadLetters, fleet.DeadLettersFilter(id)),
		"record":      Count(t, js, "KV_"+fleet.BucketJobs, "$KV."+fleet.BucketJobs+"."+id),
		"state":       state,
		"inputs":      files(fleet.ObjectInputs),
		"outputs":     files(fleet.ObjectOutputs),
	}
}

// Gone reports whether JobPieces found nothing of the job, and lists what is left.
func Gone(pieces map[string]int) (bool, []string) {
	var left []string
	for what, n := range pieces {
		if n > 0 {
			left = append(left, what)
		}
	}
	return len(left) == 0, left
}

// Count counts the messages stored in stream on the subject filters.
func Count(t testing.TB, js jetstream.JetStream, stream string, filters ...string) int {
	t.Helper()
	n, err := TryCount(js, stream, filters...)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TryCount is Count that returns its error, for a caller that asks again: a
// cluster may be electing the stream's leader. It waits up to 10 s for an answer.
func TryCount(js jetstream.JetStream, stream string, filters ...string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, stream)
	if err != nil {
		return 0, fmt.Errorf("open stream %s: %w", stream, err)
	}
	n := 0
	for _, f := range filters {
		info, err := st.Info(ctx, jetstream.WithSubjectFilter(f))
		if err != nil {
			return 0, fmt.Errorf("count %s in %s: %w", f, stream, err)
		}
		for _, c := range info.State.Subjects {
			n += int(c)
		}
	}
	return n, nil
}
