// Package comfysim simulates a ComfyUI server on a real socket, for tests,
// benchmarks and "comfyfleet up" without a GPU.
//
// It answers ComfyUI's HTTP routes (also under /api) and its websocket
// protocol the way ComfyUI 0.3.65 does: the same JSON shapes with Python's
// key order and formatting, status codes, content types, validation errors,
// and websocket message order, as recorded in
// pkg/comfy/testdata/transcripts. Prompts run one at a time on a worker
// goroutine; sampler nodes take steps × StepDuration / Speed and report
// each step with a preview, other nodes take NodeDuration / Speed; with
// ModelLoadDuration set, loading a checkpoint other than the resident one
// takes that long too. Stats records each run's start and end. Save
// nodes write real, small PNG, GIF, WebP and MP4 files to an in-memory
// disk served by /view.
//
// Like ComfyUI it keeps one websocket per client id: a new connection with
// an id takes over that id's messages, and the end of any connection with
// the id unregisters it, so a client that re-dials with its id while its
// old connection is still ending may be left with a socket that hears
// nothing.
//
// Beyond the recorded server it answers 409 when a client-chosen
// prompt_id is already queued or in the history, as newer servers do.
//
//	sim, err := comfysim.Start(comfysim.Config{StepDuration: 10 * time.Millisecond})
//	if err != nil { ... }
//	defer sim.Close()
//	// point a ComfyUI client at sim.URL()
package comfysim
