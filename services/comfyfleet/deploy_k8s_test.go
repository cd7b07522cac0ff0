package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/tidwall/gjson"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/kustomize/api/krusty"
	kustomize "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// The KEDA resources of deploy/k8s/keda.yaml, mirroring the fields of KEDA's
// keda.sh/v1alpha1 schema that a ScaledObject and a TriggerAuthentication may have
// (KEDA's own module is far too large to import for a test).
type (
	kedaScaledObject struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			ScaleTargetRef struct {
				APIVersion             string `json:"apiVersion,omitempty"`
				Kind                   string `json:"kind,omitempty"`
				Name                   string `json:"name"`
				EnvSourceContainerName string `json:"envSourceContainerName,omitempty"`
			} `json:"scaleTargetRef"`
			PollingInterval       *int32 `json:"pollingInterval,omitempty"`
			InitialCooldownPeriod *int32 `json:"initialCooldownPeriod,omitempty"`
			CooldownPeriod        *int32 `json:"cooldownPeriod,omitempty"`
			IdleReplicaCount      *int32 `json:"idleReplicaCount,omitempty"`
			MinReplicaCount       *int32 `json:"minReplicaCount,omitempty"`
			MaxReplicaCount       *int32 `json:"maxReplicaCount,omitempty"`
			Advanced              *struct {
				RestoreToOriginalReplicaCount bool `json:"restoreToOriginalReplicaCount,omitempty"`
				HorizontalPodAutoscalerConfig *struct {
					Name     string                                         `json:"name,omitempty"`
					Behavior *autoscalingv2.HorizontalPodAutoscalerBehavior `json:"behavior,omitempty"`
				} `json:"horizontalPodAutoscalerConfig,omitempty"`
				ScalingModifiers *struct {
					Formula          string `json:"formula,omitempty"`
					Target           string `json:"target,omitempty"`
					ActivationTarget string `json:"activationTarget,omitempty"`
					MetricType       string `json:"metricType,omitempty"`
				} `json:"scalingModifiers,omitempty"`
			} `json:"advanced,omitempty"`
			Fallback *struct {
				FailureThreshold int32  `json:"failureThreshold"`
				Replicas         int32  `json:"replicas"`
				Behavior         string `json:"behavior,omitempty"`
			} `json:"fallback,omitempty"`
			Triggers []struct {
				Type              string            `json:"type"`
				Name              string            `json:"name,omitempty"`
				UseCachedMetrics  bool              `json:"useCachedMetrics,omitempty"`
				Metadata          map[string]string `json:"metadata"`
				AuthenticationRef *struct {
					Name string `json:"name"`
					Kind string `json:"kind,omitempty"`
				} `json:"authenticationRef,omitempty"`
				MetricType string `json:"metricType,omitempty"`
			} `json:"triggers"`
		} `json:"spec"`
	}
	kedaSecretTargetRef struct {
		Parameter string `json:"parameter"`
		Name      string `json:"name"`
		Key       string `json:"key"`
	}
	kedaTriggerAuthentication struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			SecretTargetRef []kedaSecretTargetRef `json:"secretTargetRef,omitempty"`
			Env             []struct {
				Parameter     string `json:"parameter"`
				Name          string `json:"name"`
				ContainerName string `json:"containerName,omitempty"`
			} `json:"env,omitempty"`
		} `json:"spec"`
	}
)

// kedaMetricsAPIParameters are the trigger metadata of KEDA's metrics-api scaler.
var kedaMetricsAPIParameters = []string{"url", "format", "valueLocation", "targetValue", "activationTargetValue", "unsafeSsl",
	"aggregateFromKubeServiceEndpoints", "aggregationType", "authMode", "method", "keyParamName"}

// k8sManifests are the objects kustomize builds from deploy/k8s, decoded strictly
// into their Go types, by name.
type k8sManifests struct {
	namespace       string
	deployments     map[string]*appsv1.Deployment
	statefulSets    map[string]*appsv1.StatefulSet
	services        map[string]*corev1.Service
	configMaps      map[string]*corev1.ConfigMap
	pdbs            map[string]*policyv1.PodDisruptionBudget
	scaledObjects   map[string]*kedaScaledObject
	triggerAuths    map[string]*kedaTriggerAuthentication
	namespaceObject *corev1.Namespace
}

// decodeStrict decodes one object and fails on any field its type lacks.
func decodeStrict[T any](t *testing.T, what string, data []byte, apiVersion string) *T {
	t.Helper()
	obj := new(T)
	if err := yaml.UnmarshalStrict(data, obj); err != nil {
		t.Errorf("%s: %v", what, err)
		return nil
	}
	var meta metav1.TypeMeta
	_ = yaml.Unmarshal(data, &meta)
	if meta.APIVersion != apiVersion {
		t.Errorf("%s: apiVersion %s, want %s", what, meta.APIVersion, apiVersion)
	}
	return obj
}

// buildK8s runs kustomize on deploy/k8s as `kubectl apply -k` does and decodes every
// object it yields.
func buildK8s(t *testing.T) *k8sManifests {
	t.Helper()
	dir := filepath.Join(repoRoot(t), "deploy", "k8s")
	data, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var kustomization kustomize.Kustomization
	if err := yaml.UnmarshalStrict(data, &kustomization); err != nil {
		t.Fatalf("deploy/k8s/kustomization.yaml: %v", err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
	for _, f := range files {
		if name := filepath.Base(f); name != "kustomization.yaml" && !slices.Contains(kustomization.Resources, name) {
			t.Errorf("deploy/k8s/%s is not among the resources of kustomization.yaml", name)
		}
	}
	// Kustomize reads every file it builds from: read them here too, so that go
	// test's cache knows the test depends on them.
	for _, pattern := range []string{"deploy/k8s/*", "deploy/nats/*"} {
		matches, _ := filepath.Glob(filepath.Join(repoRoot(t), pattern))
		for _, m := range matches {
			_, _ = os.ReadFile(m)
		}
	}
	resources, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build deploy/k8s: %v", err)
	}
	m := &k8sManifests{
		namespace:   kustomization.Namespace,
		deployments: map[string]*appsv1.Deployment{}, statefulSets: map[string]*appsv1.StatefulSet{},
		services: map[string]*corev1.Service{}, configMaps: map[string]*corev1.ConfigMap{},
		pdbs: map[string]*policyv1.PodDisruptionBudget{}, scaledObjects: map[string]*kedaScaledObject{},
		triggerAuths: map[string]*kedaTriggerAuthentication{},
	}
	for _, r := range resources.Resources() {
		y, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		what := "deploy/k8s " + r.GetKind() + " " + r.GetName()
		if ns := r.GetNamespace(); r.GetKind() != "Namespace" && ns != m.namespace {
			t.Errorf("%s: namespace %q, want %q", what, ns, m.namespace)
		}
		switch r.GetKind() {
		case "Namespace":
			m.namespaceObject = decodeStrict[corev1.Namespace](t, what, y, "v1")
		case "Deployment":
			m.deployments[r.GetName()] = decodeStrict[appsv1.Deployment](t, what, y, "apps/v1")
		case "StatefulSet":
			m.statefulSets[r.GetName()] = decodeStrict[appsv1.StatefulSet](t, what, y, "apps/v1")
		case "Service":
			m.services[r.GetName()] = decodeStrict[corev1.Service](t, what, y, "v1")
		case "ConfigMap":
			m.configMaps[r.GetName()] = decodeStrict[corev1.ConfigMap](t, what, y, "v1")
		case "PodDisruptionBudget":
			m.pdbs[r.GetName()] = decodeStrict[policyv1.PodDisruptionBudget](t, what, y, "policy/v1")
		case "ScaledObject":
			m.scaledObjects[r.GetName()] = decodeStrict[kedaScaledObject](t, what, y, "keda.sh/v1alpha1")
		case "TriggerAuthentication":
			m.triggerAuths[r.GetName()] = decodeStrict[kedaTriggerAuthentication](t, what, y, "keda.sh/v1alpha1")
		default:
			t.Errorf("%s: a kind this test does not decode; add it", what)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return m
}

// k8sWorkload is a Deployment or a StatefulSet.
type k8sWorkload struct {
	kind, name string
	replicas   int32
	template   corev1.PodTemplateSpec
	selector   *metav1.LabelSelector
	claims     []corev1.PersistentVolumeClaim
}

func (m *k8sManifests) workloads() []k8sWorkload {
	var out []k8sWorkload
	for _, name := range slices.Sorted(mapKeys(m.deployments)) {
		d := m.deployments[name]
		out = append(out, k8sWorkload{"Deployment", name, ptrOr(d.Spec.Replicas, 1), d.Spec.Template, d.Spec.Selector, nil})
	}
	for _, name := range slices.Sorted(mapKeys(m.statefulSets)) {
		s := m.statefulSets[name]
		out = append(out, k8sWorkload{"StatefulSet", name, ptrOr(s.Spec.Replicas, 1), s.Spec.Template, s.Spec.Selector, s.Spec.VolumeClaimTemplates})
	}
	return out
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func ptrOr[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// selects says whether selector selects the pods of w.
func selects(t *testing.T, selector *metav1.LabelSelector, w k8sWorkload) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(selector)
	if err != nil {
		t.Errorf("selector %v: %v", selector, err)
		return false
	}
	return !s.Empty() && s.Matches(labels.Set(w.template.Labels))
}

// k8sVarRef is a $(VAR) reference in a container's env value, command or args.
var k8sVarRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// containerEnv is the environment the kubelet gives c in a pod named podName:
// secrets as "pw-<key>", the pod's fields, and $(VAR) expanded from the variables
// defined before, as Kubernetes does.
func containerEnv(t *testing.T, where string, c corev1.Container, podName, namespace string) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		switch from := e.ValueFrom; {
		case from == nil:
			env[e.Name] = expandK8sVars(e.Value, env)
		case from.SecretKeyRef != nil:
			if from.SecretKeyRef.Name != "comfyfleet-nats" {
				t.Errorf("%s: $%s from the Secret %s; the NATS passwords are in comfyfleet-nats", where, e.Name, from.SecretKeyRef.Name)
			}
			env[e.Name] = "pw-" + from.SecretKeyRef.Key
		case from.FieldRef != nil && from.FieldRef.FieldPath == "metadata.name":
			env[e.Name] = podName
		case from.FieldRef != nil && from.FieldRef.FieldPath == "metadata.namespace":
			env[e.Name] = namespace
		default:
			t.Errorf("%s: $%s: a source this test does not know", where, e.Name)
		}
	}
	return env
}

func expandK8sVars(s string, env map[string]string) string {
	return k8sVarRef.ReplaceAllStringFunc(s, func(ref string) string {
		if v, ok := env[k8sVarRef.FindStringSubmatch(ref)[1]]; ok {
			return v
		}
		return ref
	})
}

// containerPort resolves a probe's or a Service's port, by name or number, among the
// ports of c; 0 if c has no such port.
func containerPort(c corev1.Container, port intstr.IntOrString) int32 {
	for _, p := range c.Ports {
		if port.Type == intstr.String && p.Name == port.StrVal || port.Type == intstr.Int && p.ContainerPort == port.IntVal {
			return p.ContainerPort
		}
	}
	return 0
}

// isComfyfleet says whether c runs the comfyfleet image.
func isComfyfleet(c corev1.Container) bool {
	repo, _, _ := strings.Cut(c.Image, ":")
	return repo == "comfyfleet" || strings.HasSuffix(repo, "/comfyfleet")
}

// TestKubernetesManifestsDeployTheFleet builds deploy/k8s with kustomize, decodes
// every object strictly into its k8s.io/api type (KEDA's into mirrors of its schema),
// and checks what they mean: each comfyfleet container's command line and COMFYFLEET_*
// variables parse, services reach NATS as their own user through a Service that
// selects the NATS servers, probes and Services point at ports the containers listen
// on, every workload has resources, probes and exactly one PodDisruptionBudget, the
// NATS servers run hub.conf as mounted with routes to each other, and KEDA scales the
// GPU pods of a pool on that pool's depth in the intake's GET /v1/queues.
func TestKubernetesManifestsDeployTheFleet(t *testing.T) {
	m := buildK8s(t)
	if m.namespaceObject == nil || m.namespaceObject.Name != m.namespace {
		t.Errorf("deploy/k8s does not create its namespace %q", m.namespace)
	}
	workloads := m.workloads()
	byName := map[string]k8sWorkload{}
	for _, w := range workloads {
		byName[w.name] = w
	}
	natsSTS, ok := byName["nats"]
	if !ok || natsSTS.kind != "StatefulSet" {
		t.Fatal("deploy/k8s has no StatefulSet nats")
	}
	checkK8sNATS(t, m, natsSTS)

	running := map[string]int32{}         // comfyfleet command → pods
	pools := map[string]map[string]bool{} // GPU workload → pools of its nodes
	for _, w := range workloads {
		where := fmt.Sprintf("deploy/k8s %s %s", w.kind, w.name)
		if !selects(t, w.selector, w) {
			t.Errorf("%s: its selector does not select its pods", where)
		}
		var pdbs []string
		for name, pdb := range m.pdbs {
			if selects(t, pdb.Spec.Selector, w) {
				pdbs = append(pdbs, name)
			}
		}
		if len(pdbs) != 1 {
			t.Errorf("%s: PodDisruptionBudgets %v, want one", where, pdbs)
		}
		pod := w.template.Spec
		podName := w.name + "-0"
		for _, c := range pod.Containers {
			cwhere := where + " container " + c.Name
			if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
				t.Errorf("%s: resources %v; want CPU and memory requests and a memory limit", cwhere, c.Resources)
			}
			if c.LivenessProbe == nil || c.ReadinessProbe == nil {
				t.Errorf("%s: no liveness or readiness probe", cwhere)
			}
			for _, probe := range []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
				if probe != nil && (probe.HTTPGet == nil || containerPort(c, probe.HTTPGet.Port) == 0) {
					t.Errorf("%s: a probe on a port the container does not declare: %v", cwhere, probe.ProbeHandler)
				}
			}
			if !isComfyfleet(c) {
				continue
			}
			if len(c.Command) > 0 {
				t.Errorf("%s: command %q replaces the image's entry point /comfyfleet", cwhere, c.Command)
			}
			env := containerEnv(t, cwhere, c, podName, m.namespace)
			args := make([]string, len(c.Args))
			for i, a := range c.Args {
				args[i] = expandK8sVars(a, env)
			}
			fs := checkCommandLine(t, commandLine{where: cwhere, args: args, env: env})
			if fs == nil {
				continue
			}
			running[fs.Name()] += w.replicas
			checkK8sProbes(t, cwhere, c, fs)
			if fs.Lookup("nats") != nil {
				checkK8sNATSURL(t, m, cwhere, fs, natsSTS)
			}
			if fs.Name() == "executor" {
				pools[w.name] = checkK8sComfyNodes(t, cwhere, fs, pod, c)
			}
		}
	}
	for command, least := range map[string]int32{"intake": 2, "dispatcher": 2, "executor": 1, "notifier": 2} {
		if running[command] < least {
			t.Errorf("deploy/k8s runs %d %s, want at least %d", running[command], command, least)
		}
	}

	for name, svc := range m.services {
		var selected []k8sWorkload
		for _, w := range workloads {
			if selects(t, &metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, w) {
				selected = append(selected, w)
			}
		}
		if len(selected) != 1 {
			t.Errorf("deploy/k8s Service %s selects %d workloads, want one", name, len(selected))
			continue
		}
		for _, p := range svc.Spec.Ports {
			if !slices.ContainsFunc(selected[0].template.Spec.Containers, func(c corev1.Container) bool { return containerPort(c, p.TargetPort) != 0 }) {
				t.Errorf("deploy/k8s Service %s: port %s targets %s, which no container of %s declares", name, p.Name, p.TargetPort.String(), selected[0].name)
			}
		}
	}
	for name, pdb := range m.pdbs {
		if n := len(slices.DeleteFunc(slices.Clone(workloads), func(w k8sWorkload) bool { return !selects(t, pdb.Spec.Selector, w) })); n != 1 {
			t.Errorf("deploy/k8s PodDisruptionBudget %s selects %d workloads, want one", name, n)
		}
	}
	checkK8sKEDA(t, m, byName, pools)
}

// checkK8sProbes checks that a comfyfleet container's probes ask the service what it
// serves, on the port it listens on, and that it listens where the kubelet reaches it.
func checkK8sProbes(t *testing.T, where string, c corev1.Container, fs *flag.FlagSet) {
	t.Helper()
	port := serviceListenPort(t, fs)
	listen := flagValue(fs, "health")
	if fs.Name() == "intake" {
		listen = flagValue(fs, "http")
	}
	if host, _, _ := net.SplitHostPort(listen); host == "127.0.0.1" || host == "localhost" || host == "::1" {
		t.Errorf("%s: listens on %s, which the kubelet's probes cannot reach", where, listen)
	}
	for probe, path := range map[*corev1.Probe]string{c.LivenessProbe: "/healthz", c.ReadinessProbe: "/readyz"} {
		if probe == nil || probe.HTTPGet == nil {
			continue
		}
		if got := containerPort(c, probe.HTTPGet.Port); got != int32(port) || probe.HTTPGet.Path != path {
			t.Errorf("%s: probe GET :%d%s; the service answers %s on :%d", where, got, probe.HTTPGet.Path, path, port)
		}
	}
}

// checkK8sNATSURL checks that a service connects to a Service that selects the NATS
// servers, on their client port, as its own user with its own password, and keeps a
// copy of every stream on each server.
func checkK8sNATSURL(t *testing.T, m *k8sManifests, where string, fs *flag.FlagSet, nats k8sWorkload) {
	t.Helper()
	u, err := url.Parse(flagValue(fs, "nats"))
	if err != nil {
		t.Errorf("%s: --nats: %v", where, err)
		return
	}
	password, _ := u.User.Password()
	if user := fs.Name(); u.User.Username() != user || password != "pw-"+user {
		t.Errorf("%s: connects to NATS as %q with the Secret's key of %q; want user %s with key %s", where, u.User.Username(), strings.TrimPrefix(password, "pw-"), user, user)
	}
	svc, ok := m.services[u.Hostname()]
	if !ok || !selects(t, &metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, nats) {
		t.Errorf("%s: NATS at %s, which is no Service of the NATS servers", where, u.Host)
		return
	}
	reached := false
	for _, p := range svc.Spec.Ports {
		reached = reached || int(p.Port) == urlPort(u) && containerPort(nats.template.Spec.Containers[0], p.TargetPort) == 4222
	}
	if !reached {
		t.Errorf("%s: NATS at %s, which does not reach the servers' client port", where, u.Host)
	}
	if got := flagValue(fs, "replicas"); got != fmt.Sprint(nats.replicas) {
		t.Errorf("%s: --replicas %s; the NATS cluster has %d servers", where, got, nats.replicas)
	}
}

// checkK8sComfyNodes checks that an executor drives the ComfyUI of its own pod and
// returns the pools of its nodes.
func checkK8sComfyNodes(t *testing.T, where string, fs *flag.FlagSet, pod corev1.PodSpec, executor corev1.Container) map[string]bool {
	t.Helper()
	pools := map[string]bool{}
	for _, c := range *fs.Lookup("comfy").Value.(*listFlag) {
		node, _ := parseNode(c)
		u, _ := url.Parse(node.URL)
		if !slices.ContainsFunc(pod.Containers, func(c corev1.Container) bool {
			return c.Name != executor.Name && containerPort(c, intstr.FromInt(urlPort(u))) != 0
		}) || u.Hostname() != "127.0.0.1" {
			t.Errorf("%s: drives %s, which is no ComfyUI container of its pod", where, node.URL)
		}
		for _, p := range node.Pools {
			pools[p] = true
		}
	}
	return pools
}

// checkK8sNATS loads the NATS servers' configuration as a server of the StatefulSet
// would: its arguments parsed by nats-server, the ConfigMap as mounted, the
// environment of its container; and checks their routes, ports, store and probes.
func checkK8sNATS(t *testing.T, m *k8sManifests, nats k8sWorkload) {
	t.Helper()
	pod := nats.template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("deploy/k8s StatefulSet nats: %d containers, want one", len(pod.Containers))
	}
	c := pod.Containers[0]
	where := "deploy/k8s StatefulSet nats"
	files := map[string]string{} // path in the container → path here
	for _, mount := range c.VolumeMounts {
		for _, v := range pod.Volumes {
			if v.Name != mount.Name || v.ConfigMap == nil {
				continue
			}
			cm, ok := m.configMaps[v.ConfigMap.Name]
			if !ok {
				t.Fatalf("%s: mounts the ConfigMap %s, which deploy/k8s does not have", where, v.ConfigMap.Name)
			}
			dir := t.TempDir()
			for name, content := range cm.Data {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
				files[filepath.Join(mount.MountPath, name)] = filepath.Join(dir, name)
			}
		}
	}
	env := containerEnv(t, where, c, "nats-0", m.namespace)
	args := slices.Clone(c.Args)
	for i, a := range args {
		if (a == "-c" || a == "--config") && i+1 < len(args) {
			local, ok := files[args[i+1]]
			if !ok {
				t.Fatalf("%s: runs %s, which no ConfigMap mounts", where, args[i+1])
			}
			args[i+1] = local
		}
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	opts, err := server.ConfigureOptions(flag.NewFlagSet("nats-server", flag.ContinueOnError), args,
		func() { t.Error("nats-server would print its version") }, func() { t.Error("nats-server would print its help") }, func() {})
	if err != nil {
		t.Fatalf("%s: nats-server %q: %v", where, c.Args, err)
	}
	if !opts.JetStream || opts.ServerName != "nats-0" || filepath.Base(opts.ConfigFile) != "hub.conf" {
		t.Errorf("%s: runs %s as %q (JetStream %t); want hub.conf, named after its pod", where, opts.ConfigFile, opts.ServerName, opts.JetStream)
	}
	sts := m.statefulSets["nats"]
	var want, got []string
	for i := range nats.replicas {
		want = append(want, fmt.Sprintf("nats-%d.%s:%d", i, sts.Spec.ServiceName, opts.Cluster.Port))
	}
	for _, r := range opts.Routes {
		got = append(got, r.Host)
		if p, _ := r.User.Password(); r.User.Username() != opts.Cluster.Username || p != opts.Cluster.Password {
			t.Errorf("%s: route %s does not log in as the cluster's route user", where, r.Redacted())
		}
	}
	if !slices.Equal(want, got) {
		t.Errorf("%s: routes %v, want %v (the %d servers by their stable names)", where, got, want, nats.replicas)
	}
	if svc, ok := m.services[sts.Spec.ServiceName]; !ok || svc.Spec.ClusterIP != corev1.ClusterIPNone || !svc.Spec.PublishNotReadyAddresses {
		t.Errorf("%s: serviceName %q is no headless Service publishing servers before they are ready", where, sts.Spec.ServiceName)
	}
	for name, port := range map[string]int{"client": opts.Port, "cluster": opts.Cluster.Port, "leafnodes": opts.LeafNode.Port, "monitor": opts.HTTPPort} {
		if containerPort(c, intstr.FromString(name)) != int32(port) {
			t.Errorf("%s: no container port %s %d", where, name, port)
		}
	}
	for _, probe := range []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
		if probe == nil || probe.HTTPGet == nil || containerPort(c, probe.HTTPGet.Port) != int32(opts.HTTPPort) || !strings.HasPrefix(probe.HTTPGet.Path, "/healthz") {
			t.Errorf("%s: a probe is not GET /healthz on the monitoring port %d", where, opts.HTTPPort)
		}
	}
	if !slices.ContainsFunc(c.VolumeMounts, func(v corev1.VolumeMount) bool {
		return strings.HasPrefix(opts.StoreDir+"/", strings.TrimSuffix(v.MountPath, "/")+"/") &&
			slices.ContainsFunc(nats.claims, func(pvc corev1.PersistentVolumeClaim) bool { return pvc.Name == v.Name })
	}) {
		t.Errorf("%s: the JetStream store %s is on no volume claim of the StatefulSet", where, opts.StoreDir)
	}
	leaf, ok := m.services["nats-leaf"]
	if !ok || !slices.ContainsFunc(leaf.Spec.Ports, func(p corev1.ServicePort) bool { return containerPort(c, p.TargetPort) == int32(opts.LeafNode.Port) }) {
		t.Errorf("deploy/k8s: no Service nats-leaf exposing the leaf-node port %d to other regions", opts.LeafNode.Port)
	}
}

// checkK8sKEDA checks each ScaledObject: it scales a GPU workload, from the intake's
// GET /v1/queues, reading the depth of a pool the workload's nodes serve, with the
// API key of a TriggerAuthentication.
func checkK8sKEDA(t *testing.T, m *k8sManifests, workloads map[string]k8sWorkload, pools map[string]map[string]bool) {
	t.Helper()
	if len(m.scaledObjects) == 0 {
		t.Error("deploy/k8s has no KEDA ScaledObject")
	}
	intake, ok := m.services["intake"]
	if !ok {
		t.Fatal("deploy/k8s has no Service intake")
	}
	for name, so := range m.scaledObjects {
		where := "deploy/k8s ScaledObject " + name
		target := so.Spec.ScaleTargetRef
		w, ok := workloads[target.Name]
		if !ok || target.Kind != w.kind || target.APIVersion != "apps/v1" || pools[target.Name] == nil {
			t.Errorf("%s: scales %s %s, which is no workload of GPU pods", where, target.Kind, target.Name)
			continue
		}
		if lo, hi := ptrOr(so.Spec.MinReplicaCount, 0), ptrOr(so.Spec.MaxReplicaCount, 100); lo > hi || hi < 2 {
			t.Errorf("%s: replicas %d to %d", where, lo, hi)
		}
		if len(so.Spec.Triggers) != 1 || so.Spec.Triggers[0].Type != "metrics-api" {
			t.Errorf("%s: triggers %+v, want one metrics-api", where, so.Spec.Triggers)
			continue
		}
		trigger := so.Spec.Triggers[0]
		for key := range trigger.Metadata {
			if !slices.Contains(kedaMetricsAPIParameters, key) {
				t.Errorf("%s: %q is no parameter of KEDA's metrics-api scaler", where, key)
			}
		}
		u, err := url.Parse(trigger.Metadata["url"])
		if err != nil || u.Path != "/v1/queues" || u.Hostname() != fmt.Sprintf("%s.%s.svc.cluster.local", intake.Name, m.namespace) ||
			!slices.ContainsFunc(intake.Spec.Ports, func(p corev1.ServicePort) bool { return int(p.Port) == urlPort(u) }) {
			t.Errorf("%s: reads %s; want the intake's Service, full name, port and GET /v1/queues", where, trigger.Metadata["url"])
		}
		// What GET /v1/queues answers (the dispatcher's fleet.QueueSummary, as the
		// intake relays it): valueLocation must pick the depth of a pool of the
		// workload's nodes.
		for pool := range pools[target.Name] {
			raw, err := json.Marshal(fleet.QueueSummary{Pools: []fleet.PoolQueue{{Pool: "other", Depth: 3}, {Pool: pool, Depth: 12}}})
			if err != nil {
				t.Fatal(err)
			}
			queues := string(raw)
			if got := gjson.Get(queues, trigger.Metadata["valueLocation"]); got.Type != gjson.Number || got.Int() != 12 {
				t.Errorf("%s: valueLocation %q gives %s from %s, want the depth of pool %s", where, trigger.Metadata["valueLocation"], got.Raw, queues, pool)
			}
		}
		if trigger.Metadata["targetValue"] == "" || trigger.Metadata["format"] != "json" {
			t.Errorf("%s: targetValue %q, format %q", where, trigger.Metadata["targetValue"], trigger.Metadata["format"])
		}
		if trigger.Metadata["authMode"] != "bearer" || trigger.AuthenticationRef == nil {
			t.Errorf("%s: the intake wants an API key: authMode bearer and an authenticationRef", where)
			continue
		}
		auth, ok := m.triggerAuths[trigger.AuthenticationRef.Name]
		if !ok || !slices.ContainsFunc(auth.Spec.SecretTargetRef, func(r kedaSecretTargetRef) bool {
			return r.Parameter == "token" && r.Name != "" && r.Key != ""
		}) {
			t.Errorf("%s: TriggerAuthentication %s gives no token", where, trigger.AuthenticationRef.Name)
		}
	}
}
