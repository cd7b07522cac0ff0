package executor

import (
	"fmt"
	"strings"
)

// outputNames names the output files of one scene as they are stored and served:
// "s<index>_" before the file's name on the node, e.g. s3_comfyfleet_00001_.png.
// ComfyUI numbers the files of each save prefix on its own node, so scenes that ran
// on different nodes all write comfyfleet_00001_.png; with the scene index in front,
// the names of a job's files never repeat, and a client that saves them by name
// overwrites nothing. A file whose name the scene has given already (two save nodes
// with one prefix) also gets the id of the graph node that wrote it:
// s3_9_comfyfleet_00001_.png.
type outputNames struct {
	scene int
	taken map[string]bool
}

func newOutputNames(scene int) *outputNames {
	return &outputNames{scene: scene, taken: map[string]bool{}}
}

// next returns the name of the file called file on the node, written by graph node
// nodeID.
func (n *outputNames) next(nodeID, file string) string {
	file = strings.NewReplacer("/", "_", `\`, "_").Replace(file)
	name := fmt.Sprintf("s%d_%s", n.scene, file)
	for i := 1; n.taken[name]; i++ {
		name = fmt.Sprintf("s%d_%s_%s", n.scene, nodeID, file)
		if i > 1 {
			name = fmt.Sprintf("s%d_%s_%d_%s", n.scene, nodeID, i, file)
		}
	}
	n.taken[name] = true
	return name
}
