// Package fleet holds the contracts shared by every comfyfleet service: subjects,
// stream, consumer and bucket definitions, the messages that flow between services,
// the public CloudEvents, and the job state with its compare-and-set updates.
//
// Change a contract here and every service sees the change; no service defines a
// subject or a stream of its own.
package fleet
