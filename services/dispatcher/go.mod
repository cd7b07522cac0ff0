module github.com/comfyfleet/comfyfleet/services/dispatcher

go 1.26.8
