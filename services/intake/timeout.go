package intake

// defaultTimeout is the timeout_s of a scene whose request gives none: generous,
// since a video clip takes far longer than an image.
func defaultTimeout(pool string) int {
	if pool == "video" {
		return 3600
	}
	return 600
}
