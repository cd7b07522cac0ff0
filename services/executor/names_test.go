package executor

import (
	"slices"
	"testing"
)

func TestOutputNamesAreUniqueWithinAJob(t *testing.T) {
	t.Parallel()
	type file struct{ node, name string }
	for _, tc := range []struct {
		what  string
		scene int
		files []file
		want  []string
	}{
		{"one image", 0, []file{{"9", "comfyfleet_00001_.png"}}, []string{"s0_comfyfleet_00001_.png"}},
		{"the scene index leads", 3, []file{{"9", "comfyfleet_00001_.png"}}, []string{"s3_comfyfleet_00001_.png"}},
		{"two files of one save node", 12, []file{{"9", "x_00001_.png"}, {"9", "x_00002_.png"}},
			[]string{"s12_x_00001_.png", "s12_x_00002_.png"}},
		{"two save nodes, one name", 1, []file{{"9", "a.png"}, {"12", "a.png"}}, []string{"s1_a.png", "s1_12_a.png"}},
		{"one node, one name, three times", 1, []file{{"9", "a.png"}, {"9", "a.png"}, {"9", "a.png"}},
			[]string{"s1_a.png", "s1_9_a.png", "s1_9_2_a.png"}},
		{"no path separators", 2, []file{{"9", `../x/y\z.png`}}, []string{"s2_.._x_y_z.png"}},
	} {
		names := newOutputNames(tc.scene)
		var got []string
		for _, f := range tc.files {
			got = append(got, names.next(f.node, f.name))
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: names %q, want %q", tc.what, got, tc.want)
		}
	}
	// The same file of two scenes: the case that made n8n overwrite its downloads.
	a, b := newOutputNames(0).next("9", "comfyfleet_00001_.png"), newOutputNames(1).next("9", "comfyfleet_00001_.png")
	if a == b {
		t.Errorf("scenes 0 and 1 both name their file %q", a)
	}
}
