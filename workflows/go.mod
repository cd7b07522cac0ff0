module github.com/comfyfleet/comfyfleet/workflows

go 1.26.8
