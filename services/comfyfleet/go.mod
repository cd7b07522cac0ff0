module github.com/comfyfleet/comfyfleet/services/comfyfleet

go 1.26.8

require (
	github.com/comfyfleet/comfyfleet/pkg v0.0.0-00010101000000-000000000000
	github.com/comfyfleet/comfyfleet/services/dispatcher v0.0.0-00010101000000-000000000000
	github.com/comfyfleet/comfyfleet/services/executor v0.0.0-00010101000000-000000000000
	github.com/comfyfleet/comfyfleet/services/intake v0.0.0-00010101000000-000000000000
	github.com/comfyfleet/comfyfleet/services/notifier v0.0.0-00010101000000-000000000000
	github.com/comfyfleet/comfyfleet/workflows v0.0.0-00010101000000-000000000000
)

replace github.com/comfyfleet/comfyfleet/pkg => ../../pkg

replace github.com/comfyfleet/comfyfleet/workflows => ../../workflows

replace github.com/comfyfleet/comfyfleet/services/intake => ../intake

replace github.com/comfyfleet/comfyfleet/services/dispatcher => ../dispatcher

replace github.com/comfyfleet/comfyfleet/services/executor => ../executor

replace github.com/comfyfleet/comfyfleet/services/notifier => ../notifier
