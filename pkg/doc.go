// Package pkg holds nothing itself: its sub-packages carry the contracts and clients
// shared by the comfyfleet services.
package pkg
