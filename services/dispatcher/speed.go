package dispatcher

import (
	"math"
	"time"
)

// speedModel is what the dispatcher learned of one node's speed: moving averages
// of its scene durations by workflow and of its model loads, and its slowness
// relative to the fleet's reference duration of each workflow.
type speedModel struct {
	fleet *fleetSpeeds
	// byWorkflow averages this node's durations of each workflow.
	byWorkflow map[string]float64
	// slowness is this node's durations over the fleet's reference durations; a
	// node never measured starts at 1/weight.
	slowness float64
	// load averages the time this node took to load a checkpoint; 0 until measured.
	load float64
}

// fleetSpeeds holds each workflow's reference duration: what it takes on a node of
// slowness 1.
type fleetSpeeds struct {
	reference map[string]float64
}

// defaultSceneSeconds is the assumed duration, at slowness 1, of a workflow never
// measured anywhere.
const defaultSceneSeconds = 10.0

// ema is the weight of a new measurement in the moving averages.
const ema = 0.3

func newSpeedModel(f *fleetSpeeds, weight float64) *speedModel {
	if weight <= 0 {
		weight = 1
	}
	return &speedModel{fleet: f, byWorkflow: map[string]float64{}, slowness: 1 / weight}
}

func average(old, v float64) float64 {
	if old == 0 {
		return v
	}
	return ema*v + (1-ema)*old
}

// estimate predicts the duration of a scene of workflow on the node, without
// loading a model.
func (s *speedModel) estimate(workflow string) time.Duration {
	secs, ok := s.byWorkflow[workflow]
	if !ok {
		ref, known := s.fleet.reference[workflow]
		if !known {
			ref = defaultSceneSeconds
		}
		secs = ref * s.slowness
	}
	return time.Duration(secs * float64(time.Second))
}

// loadTime is the node's measured model-load time, or fallback.
func (s *speedModel) loadTime(fallback time.Duration) time.Duration {
	if s.load == 0 {
		return fallback
	}
	return time.Duration(s.load * float64(time.Second))
}

// observe learns from a scene of workflow that took d on the node, loading a model
// first when loaded.
func (s *speedModel) observe(workflow string, d time.Duration, loaded bool) {
	secs := d.Seconds()
	if secs <= 0 || math.IsNaN(secs) {
		return
	}
	if loaded {
		if base, ok := s.byWorkflow[workflow]; ok {
			s.load = average(s.load, max(secs-base, 0))
		}
		return
	}
	s.learn(workflow, secs)
}

func (s *speedModel) learn(workflow string, secs float64) {
	s.byWorkflow[workflow] = average(s.byWorkflow[workflow], secs)
	ref, ok := s.fleet.reference[workflow]
	if !ok {
		s.fleet.reference[workflow] = secs / s.slowness
		return
	}
	s.slowness = average(s.slowness, secs/ref)
}

// seed adopts the averages an executor reports for workflows the dispatcher has not
// measured on the node itself (after a dispatcher restart).
func (s *speedModel) seed(byWorkflow map[string]float64) {
	for wf, secs := range byWorkflow {
		if _, ok := s.byWorkflow[wf]; !ok && secs > 0 {
			s.learn(wf, secs)
		}
	}
}
