module github.com/comfyfleet/comfyfleet/services/notifier

go 1.26.8
