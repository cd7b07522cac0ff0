package intake

import (
	"fmt"
	"maps"
	"slices"

	"github.com/danielgtaylor/huma/v2"
)

// checkRegions returns a validation error for each scene that requires a region in
// which no registered node serves the scene's pool: it could never run. The error is
// at the field that set the region, the scene's or the job's (once).
func (in *intake) checkRegions(body *JobInput, scenes []resolved) []error {
	// pool → region → true, from the registry as the intake mirrors it.
	regions := map[string]map[string]bool{}
	for _, cfg := range in.caps.configs.all() {
		for _, pool := range cfg.Pools {
			if regions[pool] == nil {
				regions[pool] = map[string]bool{}
			}
			regions[pool][cfg.Region] = true
		}
	}
	var errs []error
	reported := map[string]bool{}
	for i, s := range scenes {
		if s.region == "" || regions[s.pool][s.region] {
			continue
		}
		loc := fmt.Sprintf("body.scenes[%d].region", i)
		if body.Scenes[i].Region == "" {
			loc = "body.region"
		}
		if reported[loc+"\x00"+s.pool] {
			continue
		}
		reported[loc+"\x00"+s.pool] = true
		known := slices.DeleteFunc(slices.Sorted(maps.Keys(regions[s.pool])), func(r string) bool { return r == "" })
		errs = append(errs, &huma.ErrorDetail{Location: loc, Value: s.region,
			Message: fmt.Sprintf("no registered node of the pool %s is in the region %q; regions with nodes of that pool: %v", s.pool, s.region, known)})
	}
	return errs
}
