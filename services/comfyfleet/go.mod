module github.com/comfyfleet/comfyfleet/services/comfyfleet

go 1.26.8
