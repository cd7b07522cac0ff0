// Package workflows ships comfyfleet's ComfyUI workflow templates: an API-format graph
// each, with the named parameters a scene may set.
package workflows

import "embed"

// FS holds the templates, one <name>.json each.
//
//go:embed *.json
var FS embed.FS
