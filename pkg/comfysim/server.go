package comfysim

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

// Config describes the simulated machine. The zero value is usable.
type Config struct {
	// Name is the GPU model, shown in /system_stats as devices[0].name
	// "cuda:0 <Name>". Defaults to "sim".
	Name string
	// Speed is the relative GPU speed: 2 runs every node twice as fast.
	// Defaults to 1.
	Speed float64
	// StepDuration is the time of one sampler step at Speed 1. Defaults
	// to 150ms (a 20-step KSampler takes 3 s); a negative value means no
	// delay.
	StepDuration time.Duration
	// NodeDuration is the time of each non-sampler node at Speed 1.
	// Defaults to 1ms; a negative value means no delay.
	NodeDuration time.Duration
	// FailureRate is the probability that a prompt ends in an
	// execution_error. Defaults to 0.
	FailureRate float64
	// OOMRate is the probability that a prompt ends in an out-of-memory
	// execution_error (exception_type "torch.OutOfMemoryError"). Defaults
	// to 0.
	OOMRate float64
	// Rand (math/rand/v2) is the source of failures, prompt ids and
	// temporary file names; the server serialises its use. Defaults to a
	// source seeded from the clock.
	Rand *rand.Rand
	// VRAMTotal is the GPU memory in bytes reported by /system_stats.
	// Defaults to 24 GiB.
	VRAMTotal int64
	// Addr is the listen address. Defaults to "127.0.0.1:0".
	Addr string
	// Logger receives the simulator's logs; routine events are logged at
	// Debug, anomalies at Warn. Defaults to slog.Default().
	Logger *slog.Logger
	// DisableCache makes every prompt execute all its nodes, like
	// ComfyUI's --cache-none, instead of reusing the outputs of nodes
	// whose inputs did not change since the previous prompt. Defaults
	// to false.
	DisableCache bool
	// ModelLoadDuration is the time to load a checkpoint that is not the
	// one loaded last; it is not scaled by Speed, since loading is bound
	// by disk and PCIe. When it is positive the GPU holds one checkpoint
	// at a time: a checkpoint loader node (CheckpointLoaderSimple,
	// ImageOnlyCheckpointLoader) for another checkpoint evicts the
	// resident one and takes this long, and a cached loader output is
	// not reused once its checkpoint is no longer resident. Kill,
	// Restart, POST /free with unload_models and out-of-memory errors
	// leave nothing resident. Zero means loads are free, the default.
	ModelLoadDuration time.Duration
	// OnRendered, if set, is called with the id of each prompt that ran to
	// success, after its history is recorded. Defaults to nil.
	OnRendered func(promptID string)
	// Models replaces the model files the node has, by input name: "ckpt_name"
	// sets the checkpoints every checkpoint loader lists in /object_info and
	// accepts, "lora_name" the LoRAs, "vae_name" the VAEs. Inputs left out
	// keep the embedded table's files (every checkpoint the shipped workflow
	// templates use). A name that no class declares as a combo input makes
	// Start fail. Defaults to nil.
	Models map[string][]string
	// WithoutClasses are node classes the node lacks, as a server without a
	// custom node ("VHS_VideoCombine") or one of an older release: they are
	// missing from /object_info, and a prompt naming one is rejected as a
	// real server rejects an unknown class. A class the table does not have
	// makes Start fail. Defaults to none.
	WithoutClasses []string
	// VideoFrameBytes is the size of each frame of the videos that
	// VHS_VideoCombine writes as mp4, webm or mov, for outputs as large as
	// real clips (tens of megabytes). Defaults to 16.
	VideoFrameBytes int
	// MaxHistory is how many finished prompts /history keeps, the oldest
	// dropped first. Defaults to ComfyUI's MAXIMUM_HISTORY_SIZE, 10000. Many
	// simulated nodes in one process may keep fewer: each entry holds its
	// prompt's graph, and the entries of hundreds of nodes make the process's
	// garbage collections long enough to stall them all at once, as real
	// nodes, each a process of its own, never are.
	MaxHistory int
}

func (c Config) withDefaults() Config {
	if c.Name == "" {
		c.Name = "sim"
	}
	if c.Speed <= 0 || math.IsNaN(c.Speed) || math.IsInf(c.Speed, 0) {
		c.Speed = 1
	}
	switch {
	case c.StepDuration == 0:
		c.StepDuration = 150 * time.Millisecond
	case c.StepDuration < 0:
		c.StepDuration = 0
	}
	switch {
	case c.NodeDuration == 0:
		c.NodeDuration = time.Millisecond
	case c.NodeDuration < 0:
		c.NodeDuration = 0
	}
	if c.Rand == nil {
		now := uint64(time.Now().UnixNano())
		c.Rand = rand.New(rand.NewPCG(now, now>>17|1))
	}
	if c.VRAMTotal <= 0 {
		c.VRAMTotal = 24 << 30
	}
	if c.Addr == "" {
		c.Addr = "127.0.0.1:0"
	}
	if c.VideoFrameBytes <= 0 {
		c.VideoFrameBytes = 16
	}
	if c.MaxHistory <= 0 {
		c.MaxHistory = maxHistory
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Stats counts what the server did since Start, across restarts.
type Stats struct {
	// Prompts is the number of prompts accepted by POST /prompt.
	Prompts int
	// Completed is the number of prompts that ended in execution_success.
	Completed int
	// Failed is the number of prompts that ended in execution_error.
	Failed int
	// Interrupted is the number of prompts that ended in
	// execution_interrupted.
	Interrupted int
	// Rendered lists the ids of the prompts that ran to success, in the
	// order they finished.
	Rendered []string
	// Runs lists every prompt that started executing and has ended, in
	// the order they ended.
	Runs []Run
}

// Run is one prompt's execution on the simulated GPU.
type Run struct {
	// PromptID is the prompt's id.
	PromptID string
	// Start is when the worker took the prompt from the queue and began
	// executing it.
	Start time.Time
	// End is when its execution ended, before its history is recorded
	// and its end announced.
	End time.Time
	// Outcome is how it ended: "success", "error", "interrupted", or
	// "aborted" when Kill or Close stopped the server during the run.
	Outcome string
	// ModelLoaded reports whether the run paid Config.ModelLoadDuration
	// to load a checkpoint (or began to, when it was interrupted or
	// aborted during the load).
	ModelLoaded bool
}

// Server is a simulated ComfyUI server listening on a real socket.
type Server struct {
	cfg   Config
	log   *slog.Logger
	files *fileStore
	speed atomic.Uint64

	rngMu sync.Mutex
	rng   *rand.Rand

	// life serialises Close, Kill and Restart; mu guards the fields
	// below it for quick reads.
	life   sync.Mutex
	mu     sync.Mutex
	addr   string
	inst   *instance
	closed bool

	statsMu sync.Mutex
	stats   Stats

	// modelsMu serialises changes of table; readers load it.
	modelsMu sync.Mutex
	table    atomic.Pointer[classTable]
}

// Start listens on cfg.Addr and serves in the background until Close.
func Start(cfg Config) (*Server, error) {
	cfg = cfg.withDefaults()
	s := &Server{cfg: cfg, log: cfg.Logger, files: newFileStore(), rng: cfg.Rand}
	s.speed.Store(math.Float64bits(cfg.Speed))
	table := classes
	if len(cfg.Models) > 0 || len(cfg.WithoutClasses) > 0 {
		t, err := classes.withModels(cfg.Models, cfg.WithoutClasses)
		if err != nil {
			return nil, fmt.Errorf("comfysim: config: %w", err)
		}
		table = t
	}
	s.table.Store(table)
	example, err := encodePNG(64, 64, colorOf(0x808080), nil)
	if err != nil {
		return nil, fmt.Errorf("comfysim: %w", err)
	}
	s.files.put(dirInput, "", "example.png", example)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.launchLocked(cfg.Addr); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) launchLocked(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("comfysim: listen on %s: %w", addr, err)
	}
	s.addr = ln.Addr().String()
	s.inst = newInstance(s, ln)
	s.inst.start()
	return nil
}

// URL returns the server's base URL, such as "http://127.0.0.1:8188".
// It stays the same across Kill and Restart.
func (s *Server) URL() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return "http://" + s.addr
}

// Close shuts the server down gracefully: it stops accepting, closes
// websockets with a close frame, aborts the running prompt and waits for
// every goroutine it started. Calling it again does nothing.
func (s *Server) Close() error {
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	inst := s.inst
	s.inst = nil
	s.mu.Unlock()
	if inst == nil {
		return nil
	}
	if err := inst.shutdown(false); err != nil {
		return fmt.Errorf("comfysim: close: %w", err)
	}
	return nil
}

// Kill simulates a crash: the listener and every open connection, HTTP
// and websocket, are closed at once, and the running prompt is abandoned
// without another message. The queue, the history, the node cache and
// the loaded models are lost, as a real ComfyUI loses them; stored files
// are kept.
func (s *Server) Kill() {
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	inst := s.inst
	s.inst = nil
	s.mu.Unlock()
	if inst != nil {
		if err := inst.shutdown(true); err != nil {
			s.log.Debug("comfysim: kill", "err", err)
		}
	}
}

// Restart brings a killed server back on the same address, with an empty
// queue and history, as a restarted ComfyUI process.
func (s *Server) Restart() error {
	s.life.Lock()
	defer s.life.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("comfysim: restart after Close")
	}
	if s.inst != nil {
		return errors.New("comfysim: restart of a running server; Kill it first")
	}
	s.files.clear(dirTemp)
	return s.launchLocked(s.addr)
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	s.statsMu.Lock()
	defer s.statsMu.Unlock()
	out := s.stats
	out.Rendered = append([]string(nil), s.stats.Rendered...)
	out.Runs = append([]Run(nil), s.stats.Runs...)
	return out
}

// Model returns the checkpoint loaded last and not unloaded since, ""
// when none is, as after Kill, Restart or /free. With ModelLoadDuration
// zero other checkpoints may stay loaded too.
func (s *Server) Model() string {
	s.mu.Lock()
	inst := s.inst
	s.mu.Unlock()
	if inst == nil {
		return ""
	}
	return inst.gpu.resident()
}

// classes returns the node classes the server has now.
func (s *Server) classes() *classTable { return s.table.Load() }

// SetModels replaces the files that the model inputs called input offer
// (see Config.Models), from the next request on: a refreshed /object_info
// shows them, and prompts are validated against them.
func (s *Server) SetModels(input string, files []string) error {
	s.modelsMu.Lock()
	defer s.modelsMu.Unlock()
	t, err := s.table.Load().withModels(map[string][]string{input: files}, nil)
	if err != nil {
		return fmt.Errorf("comfysim: set models: %w", err)
	}
	s.table.Store(t)
	return nil
}

// AddModel adds file to the files that the model inputs called input
// offer, as when a checkpoint is copied into a node's models folder.
func (s *Server) AddModel(input, file string) error {
	s.modelsMu.Lock()
	defer s.modelsMu.Unlock()
	t := s.table.Load()
	var files []string
	for _, name := range t.order {
		if in, ok := t.byName[name].input(input); ok && in.isCombo() {
			files = append(slices.Clone(in.Choices), file)
			break
		}
	}
	t, err := t.withModels(map[string][]string{input: files}, nil)
	if err != nil {
		return fmt.Errorf("comfysim: add model: %w", err)
	}
	s.table.Store(t)
	return nil
}

// SetSpeed changes the relative GPU speed from the next step or node on;
// values that are not positive reset it to 1.
func (s *Server) SetSpeed(f float64) {
	if f <= 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		f = 1
	}
	s.speed.Store(math.Float64bits(f))
}

// scaled divides a duration at Speed 1 by the current speed.
func (s *Server) scaled(d time.Duration) time.Duration {
	return time.Duration(float64(d) / math.Float64frombits(s.speed.Load()))
}

func (s *Server) countStats(f func(*Stats)) {
	s.statsMu.Lock()
	defer s.statsMu.Unlock()
	f(&s.stats)
}

// random runs f with the server's random source.
func (s *Server) random(f func(r *rand.Rand)) {
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	f(s.rng)
}

// randReader adapts the random source to io.Reader for uuid.
type randReader struct{ s *Server }

func (r randReader) Read(p []byte) (int, error) {
	r.s.random(func(rng *rand.Rand) {
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
	})
	return len(p), nil
}

// newPromptID returns a random UUID4, as the real server generates.
func (s *Server) newPromptID() string {
	id, err := uuid.NewRandomFromReader(randReader{s})
	if err != nil {
		return uuid.NewString()
	}
	return id.String()
}

// newSID returns a client id for a websocket without clientId.
func (s *Server) newSID() string {
	id, err := uuid.NewRandomFromReader(randReader{s})
	if err != nil {
		id = uuid.New()
	}
	return hex.EncodeToString(id[:])
}

// instance is one lifetime of the server process, from launch to Kill or
// Close: the listener, the queue and history, the websockets and the
// worker that executes prompts.
type instance struct {
	s      *Server
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	// killCtx ends only with Kill: it aborts websocket writes, which a
	// graceful Close lets finish.
	killCtx context.Context
	kill    context.CancelFunc
	ln      net.Listener
	addr    string
	srv     *http.Server
	hub     *hub
	q       *promptQueue
	gpu     *gpuState
	cache   map[string]*cacheEntry
	killed  atomic.Bool

	trackMu  sync.Mutex
	stopping bool
	wg       sync.WaitGroup
}

func newInstance(s *Server, ln net.Listener) *instance {
	ctx, cancel := context.WithCancel(context.Background())
	killCtx, kill := context.WithCancel(context.Background())
	in := &instance{
		s:       s,
		log:     s.log,
		ctx:     ctx,
		cancel:  cancel,
		killCtx: killCtx,
		kill:    kill,
		ln:      ln,
		addr:    ln.Addr().String(),
		hub:     newHub(s.log),
		gpu:     newGPU(s.cfg.VRAMTotal),
		cache:   map[string]*cacheEntry{},
	}
	in.q = newPromptQueue(in.hub, s.cfg.MaxHistory)
	in.srv = &http.Server{
		Handler:           http.HandlerFunc(in.serveHTTP),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	return in
}

func (in *instance) start() {
	in.wg.Go(func() {
		if err := in.srv.Serve(in.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			in.log.Warn("comfysim: serve", "err", err)
		}
	})
	in.wg.Go(in.work)
}

// track registers a goroutine that Close and Kill must wait for; it
// fails once shutdown has begun.
func (in *instance) track() bool {
	in.trackMu.Lock()
	defer in.trackMu.Unlock()
	if in.stopping {
		return false
	}
	in.wg.Add(1)
	return true
}

func (in *instance) shutdown(kill bool) error {
	in.trackMu.Lock()
	in.stopping = true
	in.trackMu.Unlock()
	in.killed.Store(kill)
	in.hub.stop()
	if kill {
		in.kill()
	}
	in.cancel()
	var err error
	if kill {
		err = in.srv.Close()
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = in.srv.Shutdown(ctx)
		cancel()
	}
	in.wg.Wait()
	in.kill()
	return err
}
