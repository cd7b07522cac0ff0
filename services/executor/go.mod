module github.com/comfyfleet/comfyfleet/services/executor

go 1.26.8

require github.com/comfyfleet/comfyfleet/pkg v0.0.0-00010101000000-000000000000

replace github.com/comfyfleet/comfyfleet/pkg => ../../pkg
