package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrJobNotFound is returned for a job id that is not in the bucket.
var ErrJobNotFound = errors.New("job not found")

// ErrNoChange may be returned by an UpdateState mutation to skip the write.
var ErrNoChange = errors.New("no change")

// Jobs reads and writes jobs. A job is kept in three parts, so that no part is
// rewritten whole for every scene event: its record as submitted (BucketJobs,
// written once), its state (BucketJobState: status, round and one byte per scene,
// changed by compare-and-set on the revision), and the events of its scenes
// (StreamEvents), from which every scene's state is folded when the job is read.
type Jobs struct {
	js      jetstream.JetStream
	nc      *nats.Conn
	apiPfx  string
	records jetstream.KeyValue
	states  jetstream.KeyValue
	pub     *Publisher
}

// OpenJobs binds to the job buckets, which Ensure must have created.
func OpenJobs(ctx context.Context, js jetstream.JetStream) (*Jobs, error) {
	records, err := js.KeyValue(ctx, BucketJobs)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", BucketJobs, err)
	}
	states, err := js.KeyValue(ctx, BucketJobState)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", BucketJobState, err)
	}
	return &Jobs{js: js, nc: js.Conn(), apiPfx: apiPrefix(js), records: records, states: states, pub: NewPublisher(js, "")}, nil
}

// Create stores the record of a new job and its state as submitted, together, so
// that job lists show it at once; it fails with jetstream.ErrKeyExists if the record
// exists. A state there already (the tracker may write it first, from a scene's
// start) is left as it is.
func (s *Jobs) Create(ctx context.Context, j *Job) error {
	msgs, err := s.CreateMessages(j, nil)
	if err != nil {
		return err
	}
	acks, err := s.pub.BatchAcks(ctx, msgs)
	if err != nil {
		return fmt.Errorf("create job %s: %w", j.ID, err)
	}
	if acks[0] == nil {
		return fmt.Errorf("create job %s: %w", j.ID, jetstream.ErrKeyExists)
	}
	return nil
}

// CreateMessages are the messages that create the record of j and its state as
// submitted, each only if absent, for a Batch that sends them with others. encoded
// is j as JSON if the caller has it (the job's commit carries it), else nil.
func (s *Jobs) CreateMessages(j *Job, encoded []byte) ([]Outgoing, error) {
	st, err := json.Marshal(NewJobState(j))
	if err != nil {
		return nil, fmt.Errorf("encode state of job %s: %w", j.ID, err)
	}
	return []Outgoing{
		{Subject: kvSubject(BucketJobs, j.ID), Value: j, Data: encoded, IfAbsent: true},
		{Subject: kvSubject(BucketJobState, j.ID), Data: st, IfAbsent: true},
	}, nil
}

// QueueMessages are the messages that queue the first run of every scene of j: the
// scenes' queued events, published by p, then their tickets, so that the events
// stream shows each scene queued before it starts. Each has its message id: the
// intake and the router may both send them.
func QueueMessages(p *Publisher, j *Job) ([]Outgoing, error) {
	events := make([]SceneEvent, len(j.Scenes))
	for i, sc := range j.Scenes {
		events[i] = SceneEvent{JobID: j.ID, Index: i, Type: EventQueued, Pool: sc.Pool, Time: j.CreatedAt}
	}
	msgs, err := p.SceneEventMessages(events)
	if err != nil {
		return nil, err
	}
	for i, sc := range j.Scenes {
		t := j.Ticket(i)
		msgs = append(msgs, Outgoing{Subject: QueueSubject(sc.Pool, j.ID, i), MsgID: t.PlacementID(), Value: t,
			Header: map[string]string{HeaderBurstLeft: strconv.Itoa(len(j.Scenes) - 1 - i)}})
	}
	return msgs, nil
}

// DropCommit asks the server to remove the schedule of a job's commit (JobCommit),
// stored at sequence seq of the submit stream, once the job is queued: the router
// then never sees the commit. It does not wait: the server answers on the subject
// reply, and CommitDropFailed reads its answer.
func (s *Jobs) DropCommit(seq uint64, reply string) error {
	req := fmt.Appendf(nil, `{"seq":%d,"no_erase":true}`, seq)
	if err := s.nc.PublishRequest(s.apiPfx+"STREAM.MSG.DELETE."+StreamSubmit, reply, req); err != nil {
		return fmt.Errorf("drop commit schedule %d: %w", seq, err)
	}
	return nil
}

// ErrCommitFired is CommitDropFailed's answer when the schedule was gone: it had
// fired, for the router.
var ErrCommitFired = errors.New("the commit had fired")

// CommitDropFailed reads the server's answer to DropCommit: why it failed, or nil.
func CommitDropFailed(answer []byte) error {
	var resp struct {
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(answer, &resp); err != nil {
		return fmt.Errorf("drop commit schedule: undecodable answer: %w", err)
	}
	switch {
	case resp.Error == nil:
		return nil
	case resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound:
		return ErrCommitFired
	}
	return fmt.Errorf("drop commit schedule: %w", resp.Error)
}

// Record returns the job as it was submitted: every scene queued.
func (s *Jobs) Record(ctx context.Context, id string) (*Job, error) {
	if !ValidToken(id) {
		return nil, ErrJobNotFound
	}
	e, err := kvGet(ctx, s.nc, s.apiPfx, s.records, BucketJobs, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, ErrJobNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("get job %s: %w", id, err)
	}
	var j Job
	if err := json.Unmarshal(e.value, &j); err != nil {
		return nil, fmt.Errorf("decode job %s: %w", id, err)
	}
	return &j, nil
}

// State returns the job's state and its revision; a job whose state was not
// written yet has the state it was submitted with and revision 0.
func (s *Jobs) State(ctx context.Context, id string) (*JobState, uint64, error) {
	if !ValidToken(id) {
		return nil, 0, ErrJobNotFound
	}
	e, err := kvGet(ctx, s.nc, s.apiPfx, s.states, BucketJobState, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		rec, err := s.Record(ctx, id)
		if err != nil {
			return nil, 0, err
		}
		return NewJobState(rec), 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("get state of job %s: %w", id, err)
	}
	var st JobState
	if err := json.Unmarshal(e.value, &st); err != nil {
		return nil, 0, fmt.Errorf("decode state of job %s: %w", id, err)
	}
	return &st, e.revision, nil
}

// UpdateState reads the job's state, applies mutate and writes it back if the
// revision is still the one read, retrying on conflict. mutate may return
// ErrNoChange to skip the write. It returns the state as written (or as read, when
// nothing changed).
func (s *Jobs) UpdateState(ctx context.Context, id string, mutate func(*JobState) error) (*JobState, error) {
	st, _, err := s.UpdateStateFrom(ctx, id, nil, 0, mutate)
	return st, err
}

// UpdateStateFrom is UpdateState starting from a state the caller read before, at
// revision rev, instead of reading it: a copy that is still current saves a read. A
// nil known reads the state first. It returns the state as written and its revision;
// known itself is left as it was.
func (s *Jobs) UpdateStateFrom(ctx context.Context, id string, known *JobState, rev uint64, mutate func(*JobState) error) (*JobState, uint64, error) {
	for {
		var st *JobState
		if known != nil {
			st, known = known.clone(), nil
		} else {
			var err error
			if st, rev, err = s.State(ctx, id); err != nil {
				return nil, 0, err
			}
		}
		if err := mutate(st); errors.Is(err, ErrNoChange) {
			return st, rev, nil
		} else if err != nil {
			return nil, 0, err
		}
		b, err := json.Marshal(st)
		if err != nil {
			return nil, 0, fmt.Errorf("encode state of job %s: %w", id, err)
		}
		var next uint64
		if rev == 0 {
			next, err = s.states.Create(ctx, id, b)
		} else {
			next, err = s.states.Update(ctx, id, b, rev)
		}
		if err == nil {
			return st, next, nil
		}
		if !casConflict(err) {
			return nil, 0, fmt.Errorf("update state of job %s: %w", id, err)
		}
		if ctx.Err() != nil {
			return nil, 0, ctx.Err()
		}
	}
}

// WrongLastSequence reports whether err is the server's refusal of a message whose
// expected last sequence did not hold: a compare-and-set lost, or a key created
// already. A replicated stream answers with a code of its own.
func WrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// Get returns the job with the state of every scene: its record and its state,
// read at once, and the last event of each type of each scene folded in.
func (s *Jobs) Get(ctx context.Context, id string) (*Job, error) {
	return s.GetEnded(ctx, id, 0)
}

// GetEnded is Get for a job known to have the given number of scenes (a DoneMsg
// says): their events are read together with the record and the state, not after
// them. The events of a job whose scenes have all ended are all stored before its
// state says so; a wrong count costs a second read.
func (s *Jobs) GetEnded(ctx context.Context, id string, scenes int) (*Job, error) {
	var (
		st              *JobState
		events          [][]SceneEvent
		stateOf, readOf error
		read            sync.WaitGroup
	)
	read.Go(func() { st, _, stateOf = s.State(ctx, id) })
	if scenes > 0 {
		read.Go(func() { events, readOf = s.sceneEvents(ctx, id, scenes) })
	}
	j, err := s.Record(ctx, id)
	read.Wait()
	if err != nil {
		return nil, err
	}
	if stateOf != nil {
		return nil, stateOf
	}
	if scenes != len(j.Scenes) || readOf != nil {
		if events, err = s.sceneEvents(ctx, id, len(j.Scenes)); err != nil {
			return nil, err
		}
	}
	j.Round = st.Round
	j.UpdatedAt = st.UpdatedAt
	j.fold(events)
	return j, nil
}

// foldChunk is how many scenes one read of their events covers: each has at most
// seven event subjects, and the server answers at most 1024 in one read.
const foldChunk = 100

// sceneEvents reads the last event of every type of each of the first scenes of
// job, in batches of foldChunk scenes read at once.
func (s *Jobs) sceneEvents(ctx context.Context, job string, scenes int) ([][]SceneEvent, error) {
	var (
		events = make([][]SceneEvent, (scenes+foldChunk-1)/foldChunk)
		wg     sync.WaitGroup
		errs   = make([]error, len(events))
	)
	for c := range events {
		wg.Go(func() {
			from := c * foldChunk
			to := min(from+foldChunk, scenes)
			filters := make([]string, 0, to-from)
			for i := from; i < to; i++ {
				filters = append(filters, fmt.Sprintf("%s.scene.%s.%d.*", eventPrefix, job, i))
			}
			msgs, err := lastMessages(ctx, s.nc, s.apiPfx, StreamEvents, filters)
			if err != nil {
				errs[c] = fmt.Errorf("read events of job %s: %w", job, err)
				return
			}
			evs := make([]SceneEvent, 0, len(msgs))
			for _, m := range msgs {
				if ev, err := DecodeSceneEvent(m.Data); err == nil {
					evs = append(evs, ev)
				}
			}
			events[c] = evs
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return events, nil
}

// fold applies to j the events of its scenes (see sceneEvents).
func (j *Job) fold(events [][]SceneEvent) {
	for _, evs := range events {
		for _, ev := range evs {
			j.Apply(ev)
		}
	}
	j.FinishedAt = nil
	if last := j.lastFinish(); last != nil {
		j.settle(*last)
	} else {
		j.settle(j.UpdatedAt)
	}
}

// lastFinish is when the scene that ended last ended, nil if none has.
func (j *Job) lastFinish() *time.Time {
	var last *time.Time
	for _, s := range j.Scenes {
		if s.FinishedAt != nil && (last == nil || s.FinishedAt.After(*last)) {
			last = s.FinishedAt
		}
	}
	return last
}

// lastMessages reads, in one batched direct get, the last message of every subject
// that matches one of filters in stream, in stream order. The stream must allow
// direct gets.
func lastMessages(ctx context.Context, nc *nats.Conn, apiPrefix, stream string, filters []string) ([]*nats.Msg, error) {
	msgs, _, err := directGet(ctx, nc, apiPrefix, stream, struct {
		MultiLast []string `json:"multi_last"`
	}{filters})
	slices.SortFunc(msgs, compareSeq)
	return msgs, err
}

// directGet sends a batched direct get request and returns the messages of its
// answer, and how many more match after them.
func directGet(ctx context.Context, nc *nats.Conn, apiPrefix, stream string, request any) ([]*nats.Msg, uint64, error) {
	req, err := json.Marshal(request)
	if err != nil {
		return nil, 0, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	// A callback subscription: a synchronous one would allocate a channel of the
	// connection's whole pending limit for every read.
	var (
		mu      sync.Mutex
		out     []*nats.Msg
		pending uint64
		failure error
		ended   = make(chan struct{})
	)
	inbox := nc.NewInbox()
	sub, err := nc.Subscribe(inbox, func(m *nats.Msg) {
		mu.Lock()
		defer mu.Unlock()
		select {
		case <-ended:
			return
		default:
		}
		switch status := m.Header.Get("Status"); status {
		case "":
			out = append(out, m)
			return
		case "204":
			pending, _ = strconv.ParseUint(m.Header.Get("Nats-Num-Pending"), 10, 64)
		case "404":
			out = nil
		default:
			failure = fmt.Errorf("direct get from %s: status %s %s", stream, status, m.Header.Get("Description"))
		}
		close(ended)
	})
	if err != nil {
		return nil, 0, err
	}
	defer sub.Unsubscribe()
	if err := nc.PublishRequest(apiPrefix+"DIRECT.GET."+stream, inbox, req); err != nil {
		return nil, 0, err
	}
	select {
	case <-ended:
	case <-ctx.Done():
		return nil, 0, fmt.Errorf("direct get from %s: %w", stream, ctx.Err())
	}
	mu.Lock()
	defer mu.Unlock()
	return out, pending, failure
}

// ReadStream returns the messages of stream on subjects matching filter, from
// sequence from on, in order, reading them in batches. The stream must allow direct
// gets.
func ReadStream(ctx context.Context, js jetstream.JetStream, stream, filter string, from uint64) ([]*nats.Msg, error) {
	nc, pfx := js.Conn(), apiPrefix(js)
	var out []*nats.Msg
	for {
		msgs, pending, err := directGet(ctx, nc, pfx, stream, struct {
			Seq   uint64 `json:"seq"`
			Next  string `json:"next_by_subj"`
			Batch int    `json:"batch"`
		}{max(from, 1), filter, 1000})
		if err != nil {
			return nil, err
		}
		out = append(out, msgs...)
		if pending == 0 || len(msgs) == 0 {
			return out, nil
		}
		last, _ := strconv.ParseUint(msgs[len(msgs)-1].Header.Get(jetstream.SequenceHeader), 10, 64)
		from = last + 1
	}
}

// MsgSequence is the stream sequence of a message read by ReadStream.
func MsgSequence(m *nats.Msg) uint64 {
	seq, _ := strconv.ParseUint(m.Header.Get(jetstream.SequenceHeader), 10, 64)
	return seq
}

func compareSeq(a, b *nats.Msg) int {
	sa, sb := MsgSequence(a), MsgSequence(b)
	switch {
	case sa < sb:
		return -1
	case sa > sb:
		return 1
	}
	return 0
}

// SceneEnded reports whether run retry (or a later one) of scene index of job has
// ended, from the scene's events: a redelivered or late scene need not run.
func (s *Jobs) SceneEnded(ctx context.Context, job string, index, retry int) (bool, error) {
	msgs, err := lastMessages(ctx, s.nc, s.apiPfx, StreamEvents,
		[]string{eventPrefix + ".scene." + job + "." + strconv.Itoa(index) + ".*"})
	if err != nil {
		return false, fmt.Errorf("read events of scene %s: %w", SceneKey(job, index), err)
	}
	for _, m := range msgs {
		ev, err := DecodeSceneEvent(m.Data)
		if err == nil && ev.Type.Terminal() && ev.Retry >= retry {
			return true, nil
		}
	}
	return false, nil
}

// PayloadsStored reports how many of the payloads of job's scenes are stored, as the
// scenes stream's leader answers (a replica behind would count too few).
func (s *Jobs) PayloadsStored(ctx context.Context, job string) (int, error) {
	stream, err := s.js.Stream(ctx, StreamScenes)
	if err != nil {
		return 0, fmt.Errorf("open stream %s: %w", StreamScenes, err)
	}
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(ScenePayloadsFilter(job)))
	if err != nil {
		return 0, fmt.Errorf("count the payloads of job %s: %w", job, err)
	}
	return len(info.State.Subjects), nil
}

// apiPrefix is the subject prefix of js's API requests, with its domain if any.
func apiPrefix(js jetstream.JetStream) string {
	o := js.Options()
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		return strings.TrimSuffix(o.APIPrefix, ".") + "."
	}
	return jetstream.DefaultAPIPrefix
}
