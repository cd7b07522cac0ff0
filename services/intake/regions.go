package intake

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/danielgtaylor/huma/v2"
)

// knownRegions are the regions some registered node was seen in. A region once seen
// is taken as known from then on, so that the jobs of a region that exists do not
// each read the registry; a region that loses its last node is no worse than one
// whose nodes are all offline: its scenes wait.
type knownRegions struct {
	mu   sync.Mutex
	seen map[string]bool
}

func (k *knownRegions) has(region string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.seen[region]
}

func (k *knownRegions) set(regions map[string]bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.seen == nil {
		k.seen = map[string]bool{}
	}
	for r := range regions {
		k.seen[r] = true
	}
}

// checkRegions returns a validation error for each region that the request requires
// (the job's region, or a scene's) and that no registered node is in: such a scene
// could never run. It reads the registry only for a region it has not seen yet; an
// error is returned when it cannot.
func (in *intake) checkRegions(ctx context.Context, body *JobInput) ([]error, error) {
	type use struct{ loc, region string }
	var unseen []use
	add := func(loc, region string) {
		if region != "" && !in.regions.has(region) {
			unseen = append(unseen, use{loc, region})
		}
	}
	add("body.region", body.Region)
	for i, s := range body.Scenes {
		add(fmt.Sprintf("body.scenes[%d].region", i), s.Region)
	}
	if len(unseen) == 0 {
		return nil, nil
	}
	nodes, err := in.registry.All(ctx)
	if err != nil {
		return nil, err
	}
	regions := map[string]bool{}
	for _, n := range nodes {
		if n.Region != "" {
			regions[n.Region] = true
		}
	}
	in.regions.set(regions)
	var errs []error
	for _, u := range unseen {
		if !regions[u.region] {
			errs = append(errs, &huma.ErrorDetail{Location: u.loc, Value: u.region,
				Message: fmt.Sprintf("no registered node is in the region %q; regions with nodes: %v", u.region, slices.Sorted(maps.Keys(regions)))})
		}
	}
	return errs, nil
}
