module github.com/comfyfleet/comfyfleet/services/executor

go 1.26.8
