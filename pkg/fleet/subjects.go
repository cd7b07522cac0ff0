package fleet

import (
	"fmt"
	"strings"
)

// Stream, bucket and object store names.
const (
	// StreamSubmit holds the commands that commit a job (its record) or a scene's
	// retry, until the dispatcher's router has recorded them and queued their scenes.
	StreamSubmit = "FLEET_SUBMIT"
	// StreamScenes holds each scene's ScenePayload (rendered graph, inputs, timeout),
	// written by the intake before the job is committed and read by executors.
	StreamScenes = "FLEET_SCENES"
	// StreamQueue holds the tickets of the scenes waiting for the dispatcher to place
	// them on a node, one subject per scene that keeps only its last message. Placing
	// a scene replaces its ticket with a tombstone that expires, so that every
	// dispatcher following the stream, standbys included, knows the queue exactly.
	StreamQueue = "FLEET_QUEUE"
	// StreamWork holds placed scenes, one subject per node, until the executor driving
	// the node acknowledges them.
	StreamWork = "FLEET_WORK"
	// StreamEvents holds the public CloudEvents of scenes and jobs.
	StreamEvents = "FLEET_EVENTS"
	// StreamDone holds one message per finished job until the notifier has handled it.
	StreamDone = "FLEET_DONE"
	// StreamDeadLetters captures the server's max-deliveries advisories for work
	// messages, so that no exhausted scene goes unnoticed while the dispatcher is down.
	StreamDeadLetters = "FLEET_DEADLETTERS"
	// StreamExpiry holds, for each job that expires before the retention (its ttl_s),
	// a message schedule that the server fires at the job's expiry on
	// ExpiryDueSubject, where the notifier's janitor deletes the job.
	StreamExpiry = "FLEET_EXPIRY"

	// BucketJobs maps a job id to its record: the Job as submitted.
	BucketJobs = "fleet_jobs"
	// BucketJobState maps a job id to its JobState.
	BucketJobState = "fleet_job_state"
	// BucketNodes maps a node id to its observed NodeStatus; entries expire when
	// heartbeats stop.
	BucketNodes = "fleet_nodes"
	// BucketRegistry maps a node id to its desired NodeConfig.
	BucketRegistry = "fleet_registry"
	// BucketAPIKeys maps the SHA-256 of an API key to what it stands for.
	BucketAPIKeys = "fleet_apikeys"
	// BucketTenants maps a tenant name to its webhook secret.
	BucketTenants = "fleet_tenants"
	// BucketDeadLetters maps DeadLetterKey to the DeadLetter of a scene that failed
	// for good.
	BucketDeadLetters = "fleet_deadletters"
	// BucketInventory maps a node id to its inventory (pkg/inventory): the node
	// classes and model files it has, as its executor last read them.
	BucketInventory = "fleet_inventory"
	// BucketLeases holds the leases that elect one instance of a service, e.g. the
	// dispatcher that places scenes; its entries expire after Settings.LeaseTTL.
	BucketLeases = "fleet_leases"
	// BucketWorkflows maps a workflow template's name to its JSON (pkg/workflow's
	// Template). Every intake mirrors it, so all of them offer the same versions.
	BucketWorkflows = "fleet_workflows"
	// BucketComfyPrompts maps the prompts sent to the ComfyUI-compatible API to
	// their jobs: "p.<tenant>.<key>" holds a prompt's record, "q.<tenant>.<key>"
	// marks it as waiting or running until a reader sees it ended (see
	// services/intake/comfydoor).
	BucketComfyPrompts = "fleet_comfy_prompts"
	// ObjectOutputs stores scene outputs under OutputKey names.
	ObjectOutputs = "fleet_outputs"
	// ObjectInputs stores the input images that clients send with their scenes, under
	// InputKey names, until an executor uploads them to the node that runs the scene.
	ObjectInputs = "fleet_inputs"
	// ObjectNodeInfo maps a node id to the /object_info answer (JSON) its executor
	// read last: what BucketInventory holds in compact form, whole.
	ObjectNodeInfo = "fleet_object_info"
)

// Subject prefixes.
const (
	submitPrefix    = "fleet.submit"
	scenePrefix     = "fleet.scene"
	queuePrefix     = "fleet.queue"
	workPrefix      = "fleet.work"
	eventPrefix     = "fleet.evt"
	donePrefix      = "fleet.done"
	heartbeatPrefix = "fleet.node.hb"
	expiryPrefix    = "fleet.expiry"
)

// Kinds of submit commands, the third token of their subjects.
const (
	SubmitJob   = "job"
	SubmitRetry = "retry"
)

// SubmitKind is the kind of command a submit subject carries: SubmitJob or SubmitRetry.
func SubmitKind(subject string) string {
	kind, _, _ := strings.Cut(strings.TrimPrefix(subject, submitPrefix+"."), ".")
	return kind
}

// SubmitJobSubject is where the router takes the commit of job: its record, once the
// payloads of its scenes are stored. The commit reaches it from the schedule on
// SubmitScheduleSubject, if its intake did not queue the job first.
func SubmitJobSubject(job string) string { return submitPrefix + "." + SubmitJob + "." + job }

// SubmitScheduleSubject is where the intake commits job: a message schedule that
// fires the commit on SubmitJobSubject a few seconds later unless the intake, having
// queued the job itself, removes it.
func SubmitScheduleSubject(job string) string { return submitPrefix + ".at." + job }

// SubmitRetrySubject is where the intake asks to run scene index of job again.
func SubmitRetrySubject(job string, index int) string {
	return fmt.Sprintf("%s.%s.%s.%d", submitPrefix, SubmitRetry, job, index)
}

// SubmitFilters match the commands of job on the submit stream: its commit, as
// scheduled and as fired, and the retries of its scenes.
func SubmitFilters(job string) []string {
	return []string{SubmitScheduleSubject(job), SubmitJobSubject(job), submitPrefix + "." + SubmitRetry + "." + job + ".>"}
}

// routerFilters match the commands the router takes: fired commits and retries, not
// the schedules that fire commits.
var routerFilters = []string{submitPrefix + "." + SubmitJob + ".*", submitPrefix + "." + SubmitRetry + ".>"}

// ScenePayloadSubject is where the payload of scene index of job is kept.
func ScenePayloadSubject(job string, index int) string {
	return fmt.Sprintf("%s.%s.%d", scenePrefix, job, index)
}

// ScenePayloadsFilter matches the payloads of every scene of job.
func ScenePayloadsFilter(job string) string { return scenePrefix + "." + job + ".>" }

// QueueSubject is where scene index of job waits, in pool, for the dispatcher to
// place it.
func QueueSubject(pool, job string, index int) string {
	return fmt.Sprintf("%s.%s.%s.%d", queuePrefix, pool, job, index)
}

// QueuePoolFilter matches the queue subjects of every scene of pool.
func QueuePoolFilter(pool string) string { return queuePrefix + "." + pool + ".>" }

// QueueFilter matches the queue subjects of every pool.
const QueueFilter = queuePrefix + ".>"

// WorkSubject is where the dispatcher places scenes for node.
func WorkSubject(node string) string { return workPrefix + "." + node }

// WorkFilter matches the work subjects of every node.
const WorkFilter = workPrefix + ".>"

// NodeFromWorkSubject returns the node of a work subject.
func NodeFromWorkSubject(subject string) string { return strings.TrimPrefix(subject, workPrefix+".") }

// SceneEventSubject is the subject of a scene event: fleet.evt.scene.<job>.<index>.<type>.
func SceneEventSubject(job string, index int, typ EventType) string {
	return fmt.Sprintf("%s.scene.%s.%d.%s", eventPrefix, job, index, typ)
}

// JobEventSubject is the subject of a job event: fleet.evt.job.<job>.<type>.
func JobEventSubject(job string, typ EventType) string {
	return fmt.Sprintf("%s.job.%s.%s", eventPrefix, job, typ)
}

// SceneEventsFilter matches every scene event of every job.
const SceneEventsFilter = eventPrefix + ".scene.>"

// SceneCancelledFilter matches the cancelled events of every scene of every job.
const SceneCancelledFilter = eventPrefix + ".scene.*.*." + string(EventCancelled)

// SceneEventFilter matches the events of type t of every scene of every job.
func SceneEventFilter(t EventType) string { return eventPrefix + ".scene.*.*." + string(t) }

// JobEventsFilter returns the filter that matches every event, scene or job, of job.
func JobEventsFilter(job string) []string {
	return []string{eventPrefix + ".scene." + job + ".>", eventPrefix + ".job." + job + ".>"}
}

// DoneSubject is where the dispatcher announces that job reached a terminal state.
func DoneSubject(job string) string { return donePrefix + "." + job }

// deadLetterAdvisories is the subject of the server's max-deliveries advisories for
// every consumer of the work stream.
const deadLetterAdvisories = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + StreamWork + ".*"

// ExpiryScheduleSubject is where job's expiry is scheduled: a message schedule that
// the server fires once, at the expiry, on ExpiryDueSubject.
func ExpiryScheduleSubject(job string) string { return expiryPrefix + ".at." + job }

// ExpiryDueSubject is where the schedule of ExpiryScheduleSubject fires when job is
// due for deletion.
func ExpiryDueSubject(job string) string { return expiryPrefix + ".due." + job }

// ExpiryDueFilter matches ExpiryDueSubject of every job.
const ExpiryDueFilter = expiryPrefix + ".due.*"

// ExpiryMsgID is the de-duplication id of job's expiry schedule.
func ExpiryMsgID(job string) string { return "expiry." + job }

// kvSubject is the subject of key in bucket.
func kvSubject(bucket, key string) string { return "$KV." + bucket + "." + key }

// DeadLettersFilter matches the dead letters of every scene of job in the subjects
// of BucketDeadLetters' stream.
func DeadLettersFilter(job string) string { return kvSubject(BucketDeadLetters, job+".>") }

// OutputKey is the object store name of output name of scene index of job.
func OutputKey(job string, index int, name string) string {
	return fmt.Sprintf("%s/%d/%s", job, index, name)
}

// InputKey is the object store name of the input image for parameter param of scene
// index of job.
func InputKey(job string, index int, param string) string {
	return fmt.Sprintf("%s/%d/%s", job, index, param)
}

// HeartbeatSubject is the core NATS subject on which an executor reports a node's
// state as it puts it in BucketNodes: core messages keep flowing through a NATS
// server's death, while a watch of the bucket may stall a few seconds.
func HeartbeatSubject(node string) string { return heartbeatPrefix + "." + node }

// HeartbeatFilter matches every node's heartbeats.
const HeartbeatFilter = heartbeatPrefix + ".*"

// ExecutorAliveSubject is where executor answers, while it runs, a request asking
// whether it lives. A request there meets "no responders" as soon as the executor's
// connection is gone, while one that is alive but slow merely answers late.
func ExecutorAliveSubject(executor string) string {
	return "fleet.exec.alive." + strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' {
			return r
		}
		return '_'
	}, executor)
}

// ValidToken reports whether s can stand as one token of a subject or a KV key:
// letters, digits, '-' and '_' only.
func ValidToken(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	return strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	}) < 0
}
