// The load generator of the peer benchmark (benches/peers): one process, many connections, one
// adapter per system (kasagi-relay's JSON protocol, Centrifuge's JSON protocol, Nchan's
// WebSocket subscribers + HTTP POST publishers, socket.io over Engine.IO v4 WebSocket).
//
// One run: -rooms R rooms of -members M members each, -publishers P publishers (publisher i
// sends to rooms i, i+P, i+2P, ... in turn, or to room i % R when P >= R; publishers are not
// members), publishing as fast as a window of -window
// unacknowledged publishes allows (-rate 0) or at a fixed total -rate per second. After
// -warmup seconds it measures for -duration seconds and prints one JSON line with counts,
// rates and latency percentiles. It prints "MEASURE_START" / "MEASURE_END" lines when the
// window opens and closes, so that the harness samples the server's CPU time over the same
// window.
//
// Every payload is ~100 bytes of JSON, {"_tK":<ns>,"p":"..."}: K = n % 16, <ns> the time the
// publish was scheduled (fixed rate) or sent (max rate), on this process's monotonic clock.
// A kasagi-relay frame may merge several deltas (from..seq): it carries the latest _tK of each
// key it covers; every covered delta counts as one delivery, and those whose key was
// overwritten get the oldest time in the frame (so merged latencies are, if anything, low).
//
// -rates R1,R2,...: one step per rate on the same connections, one JSON line (and one
// MEASURE_START/MEASURE_END pair) per step; with -search it stops after the first step whose
// members did not keep up twice, so that doubling rates find the capacity in one process.
//
// -mode idle: connect -members members to one room, print "READY", hold until stdin closes.
//
// -mode joins (kasagi only): -rooms x -members connections, connection i of room i % -rooms;
// each one joins its room (with "presence": true when -presence), waits for `joined`, leaves,
// waits for `left`, in a loop. Other messages (presence events) are read and counted, not
// decoded. With -watchers W, each room also has W connections that join once (with the same
// "presence") and stay, counting the events they get (each member's announced joins and
// leaves reach them however short its visits). With -hold D each connection stays D in the
// room before it leaves (events that come meanwhile wait in its socket): a visit that
// outlasts the relay's presence write is announced, so the events per cycle stop depending
// on how long that write waited. One JSON line: join+leave cycles per second in the
// -duration window after -warmup.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

var (
	system     = flag.String("system", "kasagi", "kasagi | centrifuge | nchan | socketio")
	wsURL      = flag.String("url", "", "WebSocket URL (nchan: base ws://host:port, /sub/ROOM is appended)")
	pubURL     = flag.String("pub-url", "", "nchan: HTTP base URL for publishers (/pub/ROOM is appended)")
	mode       = flag.String("mode", "run", "run | idle | joins")
	presence   = flag.Bool("presence", false, "joins: join with \"presence\": true")
	watchers   = flag.Int("watchers", 0, "joins: connections per room that join once and stay")
	hold       = flag.Duration("hold", 0, "joins: how long each connection stays in the room before it leaves")
	rooms      = flag.Int("rooms", 1, "rooms")
	members    = flag.Int("members", 0, "members per room")
	publishers = flag.Int("publishers", 1, "publishers")
	rate       = flag.Float64("rate", 0, "total publishes/s (0: as fast as the window allows)")
	rates      = flag.String("rates", "", "comma-separated rates: one measured step each, same connections")
	search     = flag.Bool("search", false, "with -rates: stop after the first step that does not keep up")
	window     = flag.Int("window", 4, "unacknowledged publishes per publisher")
	warmup     = flag.Float64("warmup", 1, "seconds before measuring")
	duration   = flag.Float64("duration", 3, "seconds measured")
	dialers    = flag.Int("dialers", 64, "concurrent connection attempts")
	timeout    = flag.Float64("timeout", 60, "seconds allowed for connecting and joining")
	roomPrefix = flag.String("room-prefix", "r", "room name prefix")
)

var start = time.Now()

func now() int64 { return int64(time.Since(start)) }

// ---- histograms (atomic buckets: the process is pinned to one core, so no contention) ------

const histLinear = 1000 // 1 us buckets below 1 ms, then 1 % steps

type hist struct{ b [histLinear + 1400]int64 }

func (h *hist) add(ns int64) {
	us := float64(ns) / 1e3
	var i int
	if us < histLinear {
		if us < 0 {
			us = 0
		}
		i = int(us)
	} else {
		i = histLinear + int(math.Log(us/histLinear)/math.Log(1.01))
		if i >= len(h.b) {
			i = len(h.b) - 1
		}
	}
	atomic.AddInt64(&h.b[i], 1)
}

func (h *hist) quantile(q float64) float64 { // in ms
	var total int64
	for i := range h.b {
		total += atomic.LoadInt64(&h.b[i])
	}
	if total == 0 {
		return -1
	}
	want := int64(math.Ceil(q * float64(total)))
	var seen int64
	for i := range h.b {
		seen += atomic.LoadInt64(&h.b[i])
		if seen >= want {
			if i < histLinear {
				return float64(i+1) / 1e3
			}
			return histLinear * math.Pow(1.01, float64(i-histLinear+1)) / 1e3
		}
	}
	return -1
}

// ---- shared counters ---------------------------------------------------------------------

var (
	measuring  atomic.Bool
	stopping   atomic.Bool
	delivered  atomic.Int64 // deliveries inside the window
	frames     atomic.Int64 // messages (or merged frames) received inside the window
	published  atomic.Int64 // publishes sent inside the window
	acked      atomic.Int64 // acks received inside the window
	errorsSeen atomic.Int64
	lastError  atomic.Value
	deliverLat hist
	ackLat     hist
)

func fail(err error) {
	errorsSeen.Add(1)
	lastError.Store(err.Error())
}

// ---- payloads -----------------------------------------------------------------------------

var pad = strings.Repeat("x", 70)

func payload(n int, ts int64) []byte {
	return []byte(`{"_t` + strconv.Itoa(n%16) + `":` + strconv.FormatInt(ts, 10) + `,"p":"` + pad + `"}`)
}

// scanTimes calls f with every _tK value in b.
func scanTimes(b []byte, f func(int64)) int {
	n := 0
	for {
		i := bytes.Index(b, []byte(`"_t`))
		if i < 0 {
			return n
		}
		b = b[i+3:]
		j := bytes.IndexByte(b, ':')
		if j < 0 {
			return n
		}
		b = b[j+1:]
		v, k := parseInt(b)
		if k > 0 {
			f(v)
			n++
		}
		b = b[k:]
	}
}

func parseInt(b []byte) (int64, int) {
	var v int64
	k := 0
	for k < len(b) && b[k] >= '0' && b[k] <= '9' {
		v = v*10 + int64(b[k]-'0')
		k++
	}
	return v, k
}

// intAfter returns the integer that follows key (e.g. `"seq":`) in b.
func intAfter(b []byte, key string) (int64, bool) {
	i := bytes.Index(b, []byte(key))
	if i < 0 {
		return 0, false
	}
	v, k := parseInt(b[i+len(key):])
	return v, k > 0
}

// deliver records one message (or merged frame) covering `covered` deltas.
func deliver(msg []byte, covered int64) {
	if !measuring.Load() {
		return
	}
	t := now()
	var oldest int64 = math.MaxInt64
	keys := int64(scanTimes(msg, func(ts int64) {
		deliverLat.add(t - ts)
		if ts < oldest {
			oldest = ts
		}
	}))
	if keys == 0 {
		return
	}
	for i := keys; i < covered; i++ {
		deliverLat.add(t - oldest)
	}
	if covered < keys {
		covered = keys
	}
	delivered.Add(covered)
	frames.Add(1)
}

// ---- WebSocket helpers --------------------------------------------------------------------

var dialer = &websocket.Dialer{HandshakeTimeout: 30 * time.Second, ReadBufferSize: 16384, WriteBufferSize: 4096}

type wsConn struct {
	c   *websocket.Conn
	buf []byte
	wmu sync.Mutex
}

func dial(url string, subprotocol string) (*wsConn, error) {
	d := *dialer
	d.HandshakeTimeout = time.Duration(*timeout * float64(time.Second))
	if subprotocol != "" {
		d.Subprotocols = []string{subprotocol}
	}
	c, resp, err := d.Dial(url, nil)
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("dial %s: %v (HTTP %d)", url, err, resp.StatusCode)
		}
		return nil, fmt.Errorf("dial %s: %v", url, err)
	}
	return &wsConn{c: c, buf: make([]byte, 0, 4096)}, nil
}

func (w *wsConn) read() ([]byte, error) {
	_, r, err := w.c.NextReader()
	if err != nil {
		return nil, err
	}
	b := w.buf[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	w.buf = b
	return b, nil
}

func (w *wsConn) write(b []byte) error {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	return w.c.WriteMessage(websocket.TextMessage, b)
}

// readEach hands each message to on until the connection fails; a failure is reported
// unless the run is stopping (then connections are closed on purpose).
func (w *wsConn) readEach(on func(b []byte)) {
	for {
		b, err := w.read()
		if err != nil {
			if !stopping.Load() {
				fail(err)
			}
			return
		}
		on(b)
	}
}

// readUntil reads messages until one satisfies ok (the handshake and join replies).
func (w *wsConn) readUntil(ok func([]byte) bool) error {
	_ = w.c.SetReadDeadline(time.Now().Add(time.Duration(*timeout * float64(time.Second))))
	defer w.c.SetReadDeadline(time.Time{})
	for {
		b, err := w.read()
		if err != nil {
			return err
		}
		if bytes.HasPrefix(b, []byte("2")) && *system == "socketio" {
			_ = w.write([]byte("3"))
			continue
		}
		if ok(b) {
			return nil
		}
	}
}

// ---- adapters -----------------------------------------------------------------------------

// A publisher sends publishes and reports acks through ackFn(id).
type publisher interface {
	publish(id int64, room string, data []byte) error
	close()
}

type member interface{ close() }

var pending sync.Map // id -> send time (ns), for ack latency

func acknowledge(id int64) {
	v, ok := pending.LoadAndDelete(id)
	if !ok {
		return
	}
	p := v.(*pubSlot)
	if measuring.Load() {
		acked.Add(1)
		ackLat.add(now() - p.sent)
	}
	<-p.window
}

type pubSlot struct {
	sent   int64
	window chan struct{}
}

// -- kasagi-relay --

type kasagiConn struct{ w *wsConn }

func kasagiMember(room string) (member, error) {
	w, err := dial(*wsURL, "kasagi.v1.json")
	if err != nil {
		return nil, err
	}
	if err := w.write([]byte(`{"t":"join","room":"` + room + `"}`)); err != nil {
		return nil, err
	}
	if err := w.readUntil(func(b []byte) bool { return bytes.Contains(b, []byte(`"t":"joined"`)) }); err != nil {
		return nil, fmt.Errorf("kasagi join: %v", err)
	}
	go w.readEach(func(b []byte) {
		if !bytes.Contains(b, []byte(`"t":"delta"`)) {
			if bytes.Contains(b, []byte(`"t":"error"`)) {
				fail(fmt.Errorf("kasagi: %s", b))
			}
			return
		}
		from, _ := intAfter(b, `"from":`)
		seq, _ := intAfter(b, `"seq":`)
		deliver(b, seq-from+1)
	})
	return &kasagiConn{w}, nil
}

func (k *kasagiConn) close() { _ = k.w.c.Close() }

func kasagiPublisher() (publisher, error) {
	w, err := dial(*wsURL, "kasagi.v1.json")
	if err != nil {
		return nil, err
	}
	go w.readEach(func(b []byte) {
		if id, ok := intAfter(b, `"id":`); ok {
			if bytes.Contains(b, []byte(`"t":"error"`)) {
				fail(fmt.Errorf("kasagi: %s", b))
			}
			acknowledge(id)
		}
	})
	return &kasagiConn{w}, nil
}

func (k *kasagiConn) publish(id int64, room string, data []byte) error {
	msg := make([]byte, 0, len(data)+64)
	msg = append(msg, `{"t":"delta","id":`...)
	msg = strconv.AppendInt(msg, id, 10)
	msg = append(msg, `,"room":"`...)
	msg = append(msg, room...)
	msg = append(msg, `","merge":`...)
	msg = append(msg, data...)
	msg = append(msg, '}')
	return k.w.write(msg)
}

// -- Centrifuge (JSON protocol v1: one reply or push per line) --

type centConn struct{ w *wsConn }

func centDial() (*wsConn, error) {
	w, err := dial(*wsURL, "")
	if err != nil {
		return nil, err
	}
	if err := w.write([]byte(`{"id":1,"params":{}}`)); err != nil {
		return nil, err
	}
	if err := w.readUntil(func(b []byte) bool { return bytes.Contains(b, []byte(`"id":1`)) }); err != nil {
		return nil, fmt.Errorf("centrifuge connect: %v", err)
	}
	return w, nil
}

func eachLine(b []byte, f func([]byte)) {
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			f(b)
			return
		}
		if i > 0 {
			f(b[:i])
		}
		b = b[i+1:]
	}
}

func centMember(room string) (member, error) {
	w, err := centDial()
	if err != nil {
		return nil, err
	}
	if err := w.write([]byte(`{"id":2,"method":1,"params":{"channel":"` + room + `"}}`)); err != nil {
		return nil, err
	}
	if err := w.readUntil(func(b []byte) bool { return bytes.Contains(b, []byte(`"id":2`)) }); err != nil {
		return nil, fmt.Errorf("centrifuge subscribe: %v", err)
	}
	go w.readEach(func(b []byte) {
		eachLine(b, func(l []byte) {
			if bytes.HasPrefix(l, []byte(`{"result":{"channel"`)) {
				deliver(l, 1)
			} else if bytes.Contains(l, []byte(`"error"`)) {
				fail(fmt.Errorf("centrifuge: %s", l))
			}
		})
	})
	return &centConn{w}, nil
}

func (c *centConn) close() { _ = c.w.c.Close() }

func centPublisher() (publisher, error) {
	w, err := centDial()
	if err != nil {
		return nil, err
	}
	go w.readEach(func(b []byte) {
		eachLine(b, func(l []byte) {
			if id, ok := intAfter(l, `{"id":`); ok {
				if bytes.Contains(l, []byte(`"error"`)) {
					fail(fmt.Errorf("centrifuge: %s", l))
				}
				acknowledge(id)
			}
		})
	})
	return &centConn{w}, nil
}

func (c *centConn) publish(id int64, room string, data []byte) error {
	msg := make([]byte, 0, len(data)+80)
	msg = append(msg, `{"id":`...)
	msg = strconv.AppendInt(msg, id, 10)
	msg = append(msg, `,"method":3,"params":{"channel":"`...)
	msg = append(msg, room...)
	msg = append(msg, `","data":`...)
	msg = append(msg, data...)
	msg = append(msg, `}}`...)
	return c.w.write(msg)
}

// -- Nchan (WebSocket subscriber: one message per frame; HTTP POST publisher) --

func nchanMember(room string) (member, error) {
	w, err := dial(*wsURL+"/sub/"+room, "")
	if err != nil {
		return nil, err
	}
	go w.readEach(func(b []byte) {
		deliver(b, 1)
	})
	return &centConn{w}, nil
}

// nchanPub is one keep-alive HTTP/1.1 connection with the window's POSTs pipelined on it
// (nginx answers pipelined requests in order), so that the publisher side costs the load
// generator a write and a short parse per publish, as the WebSocket adapters do.
type nchanPub struct {
	conn net.Conn
	ids  chan int64 // ids in flight, in request order
	wmu  sync.Mutex
	host string
}

func nchanPublisher() (publisher, error) {
	u := strings.TrimPrefix(*pubURL, "http://")
	conn, err := net.DialTimeout("tcp", u, 30*time.Second)
	if err != nil {
		return nil, fmt.Errorf("nchan publisher: %v", err)
	}
	n := &nchanPub{conn: conn, ids: make(chan int64, 1<<16), host: u}
	go n.readLoop()
	return n, nil
}

func (n *nchanPub) readLoop() {
	r := bufio.NewReaderSize(n.conn, 16384)
	for {
		status, err := r.ReadSlice('\n')
		if err != nil {
			if !stopping.Load() {
				fail(fmt.Errorf("nchan publisher: %v", err))
			}
			return
		}
		ok := len(status) > 12 && status[9] == '2'
		length := int64(0)
		for {
			h, err := r.ReadSlice('\n')
			if err != nil {
				if !stopping.Load() {
					fail(err)
				}
				return
			}
			if len(h) <= 2 {
				break
			}
			if len(h) > 16 && bytes.EqualFold(h[:15], []byte("Content-Length:")) {
				length, _ = parseInt(bytes.TrimSpace(h[15:]))
			}
		}
		if _, err := r.Discard(int(length)); err != nil {
			return
		}
		if !ok && !stopping.Load() {
			fail(fmt.Errorf("nchan publish: %s", bytes.TrimSpace(status)))
		}
		acknowledge(<-n.ids)
	}
}

func (n *nchanPub) publish(id int64, room string, data []byte) error {
	msg := make([]byte, 0, len(data)+160)
	msg = append(msg, "POST /pub/"...)
	msg = append(msg, room...)
	msg = append(msg, " HTTP/1.1\r\nHost: "...)
	msg = append(msg, n.host...)
	msg = append(msg, "\r\nContent-Type: application/json\r\nContent-Length: "...)
	msg = strconv.AppendInt(msg, int64(len(data)), 10)
	msg = append(msg, "\r\n\r\n"...)
	msg = append(msg, data...)
	n.wmu.Lock()
	defer n.wmu.Unlock()
	n.ids <- id
	_, err := n.conn.Write(msg)
	return err
}

func (n *nchanPub) close() { _ = n.conn.Close() }

// -- socket.io (Engine.IO v4 over WebSocket; events join(room), pub(room, data) -> d(data)) --

func sioDial() (*wsConn, error) {
	w, err := dial(*wsURL+"/socket.io/?EIO=4&transport=websocket", "")
	if err != nil {
		return nil, err
	}
	if err := w.readUntil(func(b []byte) bool { return bytes.HasPrefix(b, []byte("0")) }); err != nil {
		return nil, fmt.Errorf("engine.io open: %v", err)
	}
	if err := w.write([]byte("40")); err != nil {
		return nil, err
	}
	if err := w.readUntil(func(b []byte) bool { return bytes.HasPrefix(b, []byte("40")) }); err != nil {
		return nil, fmt.Errorf("socket.io connect: %v", err)
	}
	return w, nil
}

func sioMember(room string) (member, error) {
	w, err := sioDial()
	if err != nil {
		return nil, err
	}
	if err := w.write([]byte(`421["join","` + room + `"]`)); err != nil {
		return nil, err
	}
	if err := w.readUntil(func(b []byte) bool { return bytes.HasPrefix(b, []byte("431")) }); err != nil {
		return nil, fmt.Errorf("socket.io join: %v", err)
	}
	go w.readEach(func(b []byte) {
		switch {
		case bytes.HasPrefix(b, []byte(`42["d"`)):
			deliver(b, 1)
		case len(b) == 1 && b[0] == '2':
			_ = w.write([]byte("3"))
		}
	})
	return &centConn{w}, nil
}

func sioPublisher() (publisher, error) {
	w, err := sioDial()
	if err != nil {
		return nil, err
	}
	go w.readEach(func(b []byte) {
		switch {
		case bytes.HasPrefix(b, []byte("43")):
			id, _ := parseInt(b[2:])
			acknowledge(id)
		case len(b) == 1 && b[0] == '2':
			_ = w.write([]byte("3"))
		}
	})
	return &sioPub{w}, nil
}

type sioPub struct{ w *wsConn }

func (s *sioPub) publish(id int64, room string, data []byte) error {
	msg := make([]byte, 0, len(data)+48)
	msg = append(msg, "42"...)
	msg = strconv.AppendInt(msg, id, 10)
	msg = append(msg, `["pub","`...)
	msg = append(msg, room...)
	msg = append(msg, `",`...)
	msg = append(msg, data...)
	msg = append(msg, ']')
	return s.w.write(msg)
}

func (s *sioPub) close() { _ = s.w.c.Close() }

func newMember(room string) (member, error) {
	switch *system {
	case "kasagi":
		return kasagiMember(room)
	case "centrifuge":
		return centMember(room)
	case "nchan":
		return nchanMember(room)
	case "socketio":
		return sioMember(room)
	}
	return nil, fmt.Errorf("unknown system %q", *system)
}

func newPublisher() (publisher, error) {
	switch *system {
	case "kasagi":
		return kasagiPublisher()
	case "centrifuge":
		return centPublisher()
	case "nchan":
		return nchanPublisher()
	case "socketio":
		return sioPublisher()
	}
	return nil, fmt.Errorf("unknown system %q", *system)
}

// ---- run ----------------------------------------------------------------------------------

func roomName(i int) string { return *roomPrefix + strconv.Itoa(i) }

// connectAll opens n connections with at most -dialers at once; the first error wins.
func connectAll[T any](n int, open func(i int) (T, error)) ([]T, error) {
	out := make([]T, n)
	sem := make(chan struct{}, *dialers)
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for i := 0; i < n; i++ {
		if firstErr.Load() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			v, err := open(i)
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
				return
			}
			out[i] = v
		}(i)
	}
	wg.Wait()
	if e := firstErr.Load(); e != nil {
		return nil, e.(error)
	}
	return out, nil
}

func die(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "loadgen: "+format+"\n", a...)
	os.Exit(2)
}

func main() {
	flag.Parse()
	steps := []float64{*rate}
	if *rates != "" {
		steps = steps[:0]
		for _, f := range strings.Split(*rates, ",") {
			v, err := strconv.ParseFloat(f, 64)
			if err != nil {
				die("bad -rates: %v", err)
			}
			steps = append(steps, v)
		}
	}
	perStep := *warmup + *duration + 1
	deadline := time.AfterFunc(time.Duration((*timeout+float64(len(steps))*perStep+30)*float64(time.Second)), func() {
		die("timed out")
	})
	defer deadline.Stop()
	out := bufio.NewWriter(os.Stdout)
	say := func(s string) { fmt.Fprintln(out, s); _ = out.Flush() }

	if *mode == "joins" {
		deadline.Stop()
		b, _ := json.Marshal(joinCycles(say))
		say(string(b))
		return
	}
	t0 := time.Now()
	ms, err := connectAll(*rooms**members, func(i int) (member, error) { return newMember(roomName(i % *rooms)) })
	if err != nil {
		die("connecting members: %v", err)
	}
	connectSeconds := time.Since(t0).Seconds()
	if *mode == "idle" {
		deadline.Stop()
		say("READY")
		_, _ = io.Copy(io.Discard, os.Stdin)
		stopping.Store(true)
		for _, m := range ms {
			m.close()
		}
		return
	}
	ps, err := connectAll(*publishers, func(int) (publisher, error) { return newPublisher() })
	if err != nil {
		die("connecting publishers: %v", err)
	}
	misses := 0
	for _, r := range steps {
		res := step(ps, r, say)
		res["connect_seconds"] = connectSeconds
		b, _ := json.Marshal(res)
		say(string(b))
		// -search: stop after the second step that did not keep up (members got < 90 % of
		// the deliveries offered, or errors): two, so that one step disturbed by another
		// process on a shared machine does not end the search; they measured the overload.
		if *search && r > 0 {
			expected := r * float64(*members)
			if res["delivered_per_s"].(float64) < 0.9*expected || res["errors"].(int64) > 0 {
				misses++
				if misses == 2 {
					break
				}
			}
		}
		time.Sleep(300 * time.Millisecond) // let the last step's stragglers arrive, unmeasured
	}
	stopping.Store(true)
	for _, p := range ps {
		p.close()
	}
	for _, m := range ms {
		m.close()
	}
}

var nextID atomic.Int64

// step publishes at `rate` (0: window-paced) for -warmup + -duration seconds and returns what
// was measured in the -duration window.
func step(ps []publisher, rate float64, say func(string)) map[string]any {
	delivered.Store(0)
	frames.Store(0)
	published.Store(0)
	acked.Store(0)
	errorsSeen.Store(0)
	deliverLat = hist{}
	ackLat = hist{}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	runStart := now()
	for i, p := range ps {
		wg.Add(1)
		go func(i int, p publisher) {
			defer wg.Done()
			// Publisher i takes rooms i, i+P, i+2P, ... in turn (every room gets publishes
			// when there are more rooms than publishers), or room i % R.
			var mine []string
			for r := i % *rooms; r < *rooms; r += *publishers {
				mine = append(mine, roomName(r))
			}
			win := make(chan struct{}, *window)
			var period float64
			if rate > 0 {
				period = float64(*publishers) / rate * 1e9
			}
			// Spread the publishers' schedules over one period.
			offset := int64(period * float64(i) / float64(*publishers))
			for n := 0; ; n++ {
				var ts int64
				if period > 0 {
					ts = runStart + offset + int64(float64(n)*period)
					if d := ts - now(); d > 0 {
						select {
						case <-stop:
							return
						case <-time.After(time.Duration(d)):
						}
					}
				}
				select {
				case <-stop:
					return
				case win <- struct{}{}:
				}
				id := nextID.Add(1)
				if period == 0 {
					ts = now()
				}
				pending.Store(id, &pubSlot{sent: ts, window: win})
				if measuring.Load() {
					published.Add(1)
				}
				if err := p.publish(id, mine[n%len(mine)], payload(n, ts)); err != nil {
					if !stopping.Load() {
						fail(err)
					}
					return
				}
			}
		}(i, p)
	}
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	cpuStart := cpuNow()
	measuring.Store(true)
	say("MEASURE_START")
	t1 := time.Now()
	time.Sleep(time.Duration(*duration * float64(time.Second)))
	measuring.Store(false)
	elapsed := time.Since(t1).Seconds()
	say("MEASURE_END")
	cpuUsed := cpuNow() - cpuStart
	close(stop)
	wg.Wait()
	res := map[string]any{
		"system":          *system,
		"rate":            rate,
		"seconds":         elapsed,
		"published":       published.Load(),
		"acked":           acked.Load(),
		"delivered":       delivered.Load(),
		"published_per_s": float64(published.Load()) / elapsed,
		"acked_per_s":     float64(acked.Load()) / elapsed,
		"delivered_per_s": float64(delivered.Load()) / elapsed,
		"frames_per_s":    float64(frames.Load()) / elapsed,
		"deliver_p50_ms":  deliverLat.quantile(0.5),
		"deliver_p99_ms":  deliverLat.quantile(0.99),
		"ack_p50_ms":      ackLat.quantile(0.5),
		"ack_p99_ms":      ackLat.quantile(0.99),
		"errors":          errorsSeen.Load(),
		"loadgen_cpu":     cpuUsed / elapsed,
	}
	if e := lastError.Load(); e != nil {
		res["last_error"] = e
	}
	return res
}

// cpuNow is this process's user+system CPU seconds (from /proc/self/stat), to report whether
// the load generator itself was near its core's limit.
func cpuNow() float64 {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) / 100
}

// joinCycles runs -mode joins and returns what was measured in the -duration window.
func joinCycles(say func(string)) map[string]any {
	n := *rooms * *members
	conns, err := connectAll(n+*rooms**watchers, func(int) (*wsConn, error) { return dial(*wsURL, "kasagi.v1.json") })
	if err != nil {
		die("connecting: %v", err)
	}
	conns, stayers := conns[:n], conns[n:]
	var cycles, events, watched atomic.Int64
	var wg sync.WaitGroup
	joinedPrefix := []byte(`{"t":"joined"`)
	leftPrefix := []byte(`{"t":"left"`)
	errPrefix := []byte(`{"t":"error"`)
	for i, w := range stayers {
		room := roomName(i % *rooms)
		if w.write([]byte(`{"t":"join","room":"`+room+`","presence":`+strconv.FormatBool(*presence)+`}`)) != nil {
			die("watcher join failed")
		}
		if err := w.readUntil(func(b []byte) bool { return bytes.HasPrefix(b, joinedPrefix) }); err != nil {
			die("watcher join: %v", err)
		}
		wg.Add(1)
		go func(w *wsConn) {
			defer wg.Done()
			w.readEach(func(b []byte) {
				if bytes.HasPrefix(b, errPrefix) {
					fail(fmt.Errorf("kasagi: %s", b))
				} else if measuring.Load() {
					events.Add(1)
					watched.Add(1)
				}
			})
		}(w)
	}
	for i, w := range conns {
		wg.Add(1)
		go func(i int, w *wsConn) {
			defer wg.Done()
			room := roomName(i % *rooms)
			join := []byte(`{"t":"join","room":"` + room + `","presence":` + strconv.FormatBool(*presence) + `}`)
			leave := []byte(`{"t":"leave","room":"` + room + `"}`)
			until := func(prefix []byte) bool {
				for {
					b, err := w.read()
					if err != nil {
						if !stopping.Load() {
							fail(err)
						}
						return false
					}
					if bytes.HasPrefix(b, prefix) {
						return true
					}
					if bytes.HasPrefix(b, errPrefix) {
						fail(fmt.Errorf("kasagi: %s", b))
					} else if measuring.Load() {
						events.Add(1)
					}
				}
			}
			for !stopping.Load() {
				if w.write(join) != nil || !until(joinedPrefix) {
					return
				}
				if *hold > 0 {
					time.Sleep(*hold)
				}
				if w.write(leave) != nil || !until(leftPrefix) {
					return
				}
				if measuring.Load() {
					cycles.Add(1)
				}
			}
		}(i, w)
	}
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	cpuStart := cpuNow()
	measuring.Store(true)
	say("MEASURE_START")
	t1 := time.Now()
	time.Sleep(time.Duration(*duration * float64(time.Second)))
	measuring.Store(false)
	elapsed := time.Since(t1).Seconds()
	say("MEASURE_END")
	cpuUsed := cpuNow() - cpuStart
	stopping.Store(true)
	for _, w := range append(conns, stayers...) {
		_ = w.c.Close()
	}
	wg.Wait()
	res := map[string]any{
		"mode":          "joins",
		"presence":      *presence,
		"watchers":      *watchers,
		"hold_ms":       float64(*hold) / float64(time.Millisecond),
		"watched_per_s": float64(watched.Load()) / elapsed,
		"seconds":       elapsed,
		"cycles":        cycles.Load(),
		"cycles_per_s":  float64(cycles.Load()) / elapsed,
		"events_per_s":  float64(events.Load()) / elapsed,
		"errors":        errorsSeen.Load(),
		"loadgen_cpu":   cpuUsed / elapsed,
	}
	if e := lastError.Load(); e != nil {
		res["last_error"] = e
	}
	return res
}
