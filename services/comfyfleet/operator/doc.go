// Package operator holds the tests of what an operator uses beside the API: the web
// panel and the API docs, driven in a real headless Chromium whose network reaches
// only the fleet under test, and the Prometheus metrics, each against a whole fleet
// (comfyfleet's stack: embedded NATS, the four services, simulated ComfyUI nodes).
//
// The browser tests need Chromium (Debian: apt-get install chromium) and skip without
// it. To rewrite the panel's screenshot in docs/:
//
//	go test ./services/comfyfleet/operator -run TestPanel -args -panel.screenshot=$PWD/docs/panel.png
package operator
