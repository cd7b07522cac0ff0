package fleet

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/inventory"
	"github.com/comfyfleet/comfyfleet/pkg/jsontree"
)

// Graph is a ComfyUI API-format workflow: node id to {"class_type", "inputs", "_meta"}.
type Graph = map[string]any

// SceneSpec is what a client asks for one scene: a workflow template with parameters,
// or a raw graph.
type SceneSpec struct {
	Workflow string         `json:"workflow,omitempty"`
	Params   map[string]any `json:"params,omitempty"`
	Graph    Graph          `json:"graph,omitempty"`
	Pool     string         `json:"pool,omitempty"`
	// TimeoutS is the most seconds one attempt may run: the client's, or the pool's
	// default.
	TimeoutS int `json:"timeout_s,omitempty"`
	// Inputs are the scene's input images as stored, so that a retry uploads them again.
	Inputs []Input `json:"inputs,omitempty"`
}

// Timeout is TimeoutS as a duration, zero for no limit.
func (s SceneSpec) Timeout() time.Duration { return time.Duration(s.TimeoutS) * time.Second }

// Ticket is a scene on its way through the queue to a node, and back to the queue
// when an attempt fails or its node is lost: who and what the scene is, without its
// graph, which executors read from the scene's ScenePayload. It is what the
// dispatcher keeps for every waiting scene, so it stays small.
type Ticket struct {
	JobID    string `json:"job_id"`
	Index    int    `json:"index"`
	Tenant   string `json:"tenant,omitempty"`
	Priority int    `json:"priority"`
	Pool     string `json:"pool"`
	Workflow string `json:"workflow,omitempty"`
	// Model is the checkpoint the scene's graph loads first (see Checkpoint).
	Model       string    `json:"model,omitempty"`
	SubmittedAt time.Time `json:"submitted_at"`
	// Retry is how many times the scene was run again by hand after it failed; 0 for
	// its first run.
	Retry int `json:"retry,omitempty"`
	// AttemptBase is the number of attempts made in earlier runs, so attempts keep
	// counting up across retries.
	AttemptBase int `json:"attempt_base,omitempty"`
	// Requeued is the number of attempts of this run that ended with the scene put
	// back in the queue: failed transiently, or lost with their node.
	Requeued int `json:"requeued,omitempty"`
	// Lost is how many of those attempts the fleet ended, not the scene: their node
	// or its executor taken for lost, or the executor stopping (see LossAllowance).
	Lost int `json:"lost,omitempty"`
	// Moves counts every return to the queue, attempts or not (a node drained or an
	// executor stopping hands its scenes back), so that each has its own message id.
	Moves int `json:"moves,omitempty"`
	// NotBefore keeps a requeued scene from being placed again before its back-off
	// has passed.
	NotBefore time.Time `json:"not_before,omitzero"`
	// Avoid is the node whose attempt failed last: the dispatcher places the scene
	// elsewhere when another node can take it.
	Avoid string `json:"avoid,omitempty"`
	// Failures are this run's failed attempts so far, so that the scene's retrying
	// and failed events carry its whole history.
	Failures []Attempt `json:"failures,omitempty"`
	// Needs are the node classes and model files the scene's graph names: it is
	// placed only on a node whose inventory has them all (or is not known yet).
	Needs *inventory.Requirements `json:"needs,omitempty"`
	// Region, if set, is the only region whose nodes may run the scene;
	// PreferRegion is one whose nodes it goes to unless others finish it
	// markedly sooner.
	Region       string `json:"region,omitempty"`
	PreferRegion string `json:"prefer_region,omitempty"`
}

// ScenePayload is what an executor needs to run a scene beyond its Ticket: the graph,
// already rendered, its input images and its timeout. The intake stores it once per
// scene, before the job is committed, on ScenePayloadSubject.
type ScenePayload struct {
	JobID string `json:"job_id"`
	Index int    `json:"index"`
	Graph Graph  `json:"graph"`
	// Timeout is the most time one attempt may run on its node; then it is
	// interrupted and counts as a transient failure. Zero means no limit.
	Timeout time.Duration `json:"timeout_ns,omitempty"`
	// Inputs are the images to upload to the node before the graph is submitted.
	Inputs []Input `json:"inputs,omitempty"`
}

// MsgID is the de-duplication id of the scene's payload.
func (p ScenePayload) MsgID() string { return "payload." + SceneKey(p.JobID, p.Index) }

// Encode returns p as json.Marshal writes it, about three times faster: the graph
// is written by jsontree.
func (p ScenePayload) Encode() ([]byte, error) {
	b := make([]byte, 0, 1024)
	b = append(b, `{"job_id":`...)
	b = jsontree.AppendString(b, p.JobID)
	b = append(b, `,"index":`...)
	b = strconv.AppendInt(b, int64(p.Index), 10)
	b = append(b, `,"graph":`...)
	b, err := jsontree.Append(b, p.Graph)
	if err != nil {
		return nil, fmt.Errorf("encode the graph of scene %s: %w", SceneKey(p.JobID, p.Index), err)
	}
	if p.Timeout != 0 {
		b = append(b, `,"timeout_ns":`...)
		b = strconv.AppendInt(b, int64(p.Timeout), 10)
	}
	if len(p.Inputs) > 0 {
		inputs, err := json.Marshal(p.Inputs)
		if err != nil {
			return nil, fmt.Errorf("encode the inputs of scene %s: %w", SceneKey(p.JobID, p.Index), err)
		}
		b = append(b, `,"inputs":`...)
		b = append(b, inputs...)
	}
	return append(b, '}'), nil
}

// Binding names one node input that a template parameter sets. In a template Node is
// the node's id or its `_meta.title`; in an Input it is always the node's id.
type Binding struct {
	Node  string `json:"node" doc:"Node id, or the node's _meta.title."`
	Input string `json:"input" doc:"Name of the node's input."`
}

// MaxInputBytes is the largest input image a scene may carry.
const MaxInputBytes = 20 << 20

// Input is an image that a scene needs on its node. The executor fetches it from the
// ObjectInputs store (Object) or from the web (URL), uploads it to the node that runs
// the scene, and sets the uploaded file's name at every Bind.
type Input struct {
	// Param is the template parameter the image is for.
	Param string `json:"param"`
	// Object is the image's InputKey in ObjectInputs; URL is set instead for an image
	// the executor downloads.
	Object string `json:"object,omitempty"`
	URL    string `json:"url,omitempty"`
	// Bind lists the graph's node inputs, by node id, that name the image file.
	Bind []Binding `json:"bind"`
}

// RunKey names the ticket's run of its scene in logs, in the dispatcher's books and in
// executors: one per scene and retry by hand.
func (t Ticket) RunKey() string { return SceneKey(t.JobID, t.Index) + retrySuffix(t.Retry) }

// PlacementID is the de-duplication id of the scene's queue entry and of the work
// message that places it: a second dispatcher placing the same entry elsewhere, or
// a dispatcher retrying a placement, is dropped as a duplicate.
func (t Ticket) PlacementID() string { return t.RunKey() + ".m" + strconv.Itoa(t.Moves) }

// Attempt is the attempt number of the ticket's delivered-th delivery on its node.
func (t Ticket) Attempt(delivered int) int { return t.AttemptBase + t.Requeued + delivered }

// LossAllowance is how many attempts of a run that the fleet ended (see Ticket.Lost)
// do not use up the scene's attempts (Settings.MaxAttempts): a GPU machine that goes
// away, a node or executor too overloaded to answer its probes in time, an executor
// that stops, is not the scene's failure. Losses beyond it count, so that a scene
// that keeps taking its nodes down still fails.
const LossAllowance = 5

// AttemptsUsed is how many of the scene's attempts this run has used once the
// attempt numbered attempt has ended, that attempt a loss if lost: every attempt
// of the run but the losses LossAllowance forgives.
func (t Ticket) AttemptsUsed(attempt int, lost bool) int {
	losses := t.Lost
	if lost {
		losses++
	}
	return attempt - t.AttemptBase - min(losses, LossAllowance)
}

// AfterLoss returns t with one more of its attempts counted as lost (Ticket.Lost).
func (t Ticket) AfterLoss() Ticket {
	t.Lost++
	return t
}

// Requeue returns the ticket to put back in the queue, counting attempted more
// attempts of this run, to be placed again after delay and elsewhere than avoid if
// possible. A failure, if not nil, joins the run's history.
func (t Ticket) Requeue(attempted int, avoid string, delay time.Duration, failure *Attempt) Ticket {
	t.Requeued += attempted
	t.Moves++
	t.Avoid = avoid
	t.NotBefore = time.Time{}
	if delay > 0 {
		t.NotBefore = time.Now().Add(delay).UTC()
	}
	if failure != nil {
		t.Failures = append(slices.Clip(t.Failures), *failure)
	}
	return t
}

// Checkpoint is the model checkpoint a graph loads first (by node id), or "".
// Scenes of one checkpoint run back to back on a node without loading it again.
func Checkpoint(g Graph) string {
	var best, model string
	for id, raw := range g {
		n, ok := raw.(map[string]any)
		if !ok {
			continue
		}
		class, _ := n["class_type"].(string)
		if class != "CheckpointLoaderSimple" && class != "ImageOnlyCheckpointLoader" && class != "CheckpointLoader" {
			continue
		}
		inputs, _ := n["inputs"].(map[string]any)
		name, _ := inputs["ckpt_name"].(string)
		if name != "" && (best == "" || id < best) {
			best, model = id, name
		}
	}
	return model
}

func retrySuffix(retry int) string {
	if retry == 0 {
		return ""
	}
	return ".r" + strconv.Itoa(retry)
}

// SceneKey names scene index of job in message ids and logs.
func SceneKey(job string, index int) string { return job + "." + strconv.Itoa(index) }

// Output is one stored file of a scene.
type Output struct {
	Name        string `json:"name"`
	ContentType string `json:"content_type"`
	Size        int64  `json:"size"`
	// Kind is the ComfyUI output key the file came from: images, gifs, audio, ….
	Kind string `json:"kind,omitempty"`
	// NodeID is the graph node that produced the file.
	NodeID string `json:"node_id,omitempty"`
}

// Progress is a running scene's sampler progress.
type Progress struct {
	Value int    `json:"value"`
	Max   int    `json:"max"`
	Node  string `json:"node,omitempty"`
}

// NodeConfig is the desired configuration of a ComfyUI node, registered through the
// API or by an executor at start.
type NodeConfig struct {
	ID     string            `json:"id"`
	URL    string            `json:"url"`
	Pools  []string          `json:"pools"`
	Weight float64           `json:"weight"`
	Labels map[string]string `json:"labels,omitempty"`
	// Drained keeps the dispatcher from placing new scenes on the node; the scenes
	// it holds finish.
	Drained bool `json:"drained,omitempty"`
	// Executor is the executor that drives the node: the one that registered it, or
	// the first that adopted it. Empty for a node registered through the API and not
	// adopted yet.
	Executor string `json:"executor,omitempty"`
	// Region is where the node is, e.g. "shanghai"; empty for a fleet in one place.
	Region string `json:"region,omitempty"`
}

// NodeState is what a node is observed doing.
type NodeState string

// Observed node states.
const (
	NodeOnline NodeState = "online"
	NodeBusy   NodeState = "busy"
	// NodeDraining is a drained node; it is busy until the scenes it holds finish.
	NodeDraining NodeState = "draining"
	NodeOffline  NodeState = "offline"
)

// NodeStatus is a node's observed state, sent as a heartbeat by the executor that
// drives it and kept in BucketNodes until it expires.
type NodeStatus struct {
	ID             string    `json:"id"`
	URL            string    `json:"url"`
	Pools          []string  `json:"pools"`
	Executor       string    `json:"executor"`
	State          NodeState `json:"state"`
	Scene          string    `json:"scene,omitempty"`
	QueueRemaining int       `json:"queue_remaining"`
	VRAMTotal      int64     `json:"vram_total,omitempty"`
	VRAMFree       int64     `json:"vram_free,omitempty"`
	Device         string    `json:"device,omitempty"`
	ScenesDone     int       `json:"scenes_done"`
	// Holding is how many scenes the executor holds for the node: running, and
	// queued inside ComfyUI behind it.
	Holding int `json:"holding"`
	// SecondsPerScene is the moving average of this node's scene durations.
	SecondsPerScene float64 `json:"seconds_per_scene,omitempty"`
	// SecondsPerStep is the moving average of a sampler step's duration.
	SecondsPerStep float64 `json:"seconds_per_step,omitempty"`
	// Workflows is the moving average of scene durations by workflow, in seconds,
	// without the time spent loading a model.
	Workflows map[string]float64 `json:"workflows,omitempty"`
	// Model is the checkpoint the node loaded last.
	Model string `json:"model,omitempty"`
	// Inventory is the version of the node's inventory that its executor
	// published last (BucketInventory); empty while none could be read. A
	// dispatcher that has not read that version yet places no scene that needs
	// anything on the node.
	Inventory string `json:"inventory,omitempty"`
	// Region is where the node is.
	Region string `json:"region,omitempty"`
	// SetupSeconds is the moving average of the time from a scene's delivery to its
	// prompt being on the node: reading its payload and inputs, uploading them.
	// Across regions it holds the cost of the distance.
	SetupSeconds float64   `json:"setup_seconds,omitempty"`
	Error        string    `json:"error,omitempty"`
	Heartbeat    time.Time `json:"heartbeat"`
}

// NodeRefreshReply answers a request on NodeRefreshSubject (see RefreshNode): the inventory version
// the node has now, and whether the read changed it; or why it could not be read.
type NodeRefreshReply struct {
	Version string `json:"version,omitempty"`
	Changed bool   `json:"changed,omitempty"`
	Error   string `json:"error,omitempty"`
}

// SubmitMsgID is the de-duplication id of job's commit on the submit stream.
func SubmitMsgID(job string) string { return "submit." + job }

// CommitGrace is how long a job's intake has to queue the job it committed before the
// commit fires for the router, which queues it then.
const CommitGrace = 3 * time.Second

// JobCommit is the message that commits j, encoded as JSON: a schedule that fires it
// on SubmitJobSubject CommitGrace from now (at the next whole second), for the router,
// unless the intake removes it once it has queued the job (DropCommit).
func JobCommit(j *Job, encoded []byte) Outgoing {
	at := time.Now().Add(CommitGrace).Truncate(time.Second).Add(time.Second)
	return Outgoing{
		Subject: SubmitScheduleSubject(j.ID),
		MsgID:   SubmitMsgID(j.ID),
		Data:    encoded,
		Opts:    []jetstream.PublishOpt{jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(SubmitJobSubject(j.ID))},
	}
}

// HeaderBurstLeft tells, on a ticket, how many tickets of its job follow it in the
// same batch, so that the scheduler can wait for them a moment and plan them together.
const HeaderBurstLeft = "Comfyfleet-Burst-Left"

// SceneRetry asks the dispatcher's router to run scene Index of job JobID again after
// it failed: run Retry, its attempts counting on from AttemptBase.
type SceneRetry struct {
	JobID       string    `json:"job_id"`
	Index       int       `json:"index"`
	Retry       int       `json:"retry"`
	AttemptBase int       `json:"attempt_base"`
	At          time.Time `json:"at"`
}

// MsgID is the de-duplication id of the retry command.
func (r SceneRetry) MsgID() string {
	return "retry." + SceneKey(r.JobID, r.Index) + retrySuffix(r.Retry)
}

// DoneMsg tells the notifier that a job reached a terminal state.
type DoneMsg struct {
	JobID string `json:"job_id"`
	// Round counts how often the job was reopened by a scene retry before it ended.
	Round int `json:"round,omitempty"`
	// Scenes is how many scenes the job has, so that its reader can read their
	// events together with the job (see Jobs.GetEnded); 0 if not known.
	Scenes int `json:"scenes,omitempty"`
}

// MsgID is the de-duplication id of the done message: one per job and round.
func (d DoneMsg) MsgID() string { return "done." + d.JobID + retrySuffix(d.Round) }

// DeadLetter is a scene that failed for good, kept in BucketDeadLetters until it is
// retried.
type DeadLetter struct {
	JobID    string    `json:"job_id"`
	Index    int       `json:"index"`
	Tenant   string    `json:"tenant,omitempty"`
	Workflow string    `json:"workflow,omitempty"`
	Pool     string    `json:"pool"`
	Error    string    `json:"error"`
	Attempts int       `json:"attempts"`
	Failures []Attempt `json:"failures"`
	FailedAt time.Time `json:"failed_at"`
}

// JobExpiry is the message of a job's expiry schedule: the server fires it on
// ExpiryDueSubject at ExpiresAt, and the janitor deletes the job.
type JobExpiry struct {
	JobID     string    `json:"job_id"`
	ExpiresAt time.Time `json:"expires_at"`
}

// ExpirySchedule is the message that schedules the deletion of j at its ExpiresAt,
// which must be set: a message schedule fires at whole seconds, so ExpiresAt should
// be one.
func ExpirySchedule(j *Job) Outgoing {
	return Outgoing{
		Subject: ExpiryScheduleSubject(j.ID),
		MsgID:   ExpiryMsgID(j.ID),
		Value:   JobExpiry{JobID: j.ID, ExpiresAt: *j.ExpiresAt},
		Opts:    []jetstream.PublishOpt{jetstream.WithScheduleAt(*j.ExpiresAt), jetstream.WithScheduleTarget(ExpiryDueSubject(j.ID))},
	}
}

// DeadLetterKey is the key of scene index of job in BucketDeadLetters.
func DeadLetterKey(job string, index int) string { return SceneKey(job, index) }

// InputImageType returns the content type and file extension of an input image by
// its first bytes: PNG, JPEG and WEBP are accepted; ok is false for anything else.
func InputImageType(data []byte) (contentType, ext string, ok bool) {
	switch {
	case bytes.HasPrefix(data, []byte("\x89PNG\r\n\x1a\n")):
		return "image/png", ".png", true
	case bytes.HasPrefix(data, []byte("\xff\xd8\xff")):
		return "image/jpeg", ".jpg", true
	case len(data) >= 12 && string(data[:4]) == "RIFF" && string(data[8:12]) == "WEBP":
		return "image/webp", ".webp", true
	}
	return "", "", false
}

// QueuesSubject is where a dispatcher answers requests for a QueueSummary.
const QueuesSubject = "fleet.sched.queues"

// QueueSummary is what waits in the queue and how fast scenes flow, as a dispatcher
// sees it.
type QueueSummary struct {
	Pools []PoolQueue `json:"pools" doc:"Every pool with scenes waiting or nodes serving it, by name."`
	// Nodes counts the known nodes by state: online, busy, draining, offline.
	Nodes map[string]int `json:"nodes" doc:"Known nodes by status: online, busy, draining, offline."`
	Rates QueueRates     `json:"rates"`
	// Dispatcher is the dispatcher that answered, and Leading whether it places.
	Dispatcher string    `json:"dispatcher" doc:"The dispatcher that answered."`
	Leading    bool      `json:"leading" doc:"Whether that dispatcher places scenes (the others stand by)."`
	At         time.Time `json:"at" doc:"When the dispatcher took the figures."`
}

// PoolQueue is the waiting scenes of one pool.
type PoolQueue struct {
	Pool string `json:"pool"`
	// Depth counts every waiting scene, Delayed those whose retry back-off runs.
	Depth   int `json:"depth" doc:"Scenes waiting for a node."`
	Delayed int `json:"delayed" doc:"Of those, scenes whose retry back-off runs."`
	// OldestAgeS is how long the oldest waiting scene has waited since its
	// submission, in seconds.
	OldestAgeS float64        `json:"oldest_age_s" doc:"Seconds the oldest waiting scene has waited since its submission; 0 when none waits."`
	ByPriority map[string]int `json:"by_priority" doc:"Waiting scenes by priority."`
	ByTenant   map[string]int `json:"by_tenant" doc:"Waiting scenes by tenant."`
}

// QueueRates are the rates of the last minute, per second.
type QueueRates struct {
	AcceptedPerS  float64 `json:"accepted_per_s" doc:"Scenes accepted a second."`
	CompletedPerS float64 `json:"completed_per_s" doc:"Scenes completed a second."`
	FailedPerS    float64 `json:"failed_per_s" doc:"Scenes failed (for good) a second."`
}
