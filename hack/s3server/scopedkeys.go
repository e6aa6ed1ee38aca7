package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"sync"
	"time"
)

// scopedKeysFile is the set of scoped keys kept in a JSON file
// (DSJOBS_S3_SCOPED_KEYS_FILE) that another process may create, rewrite or
// remove while the server runs:
//
//	[{"accessKey": "...", "secretKey": "...", "prefix": "projects/p1/"}, ...]
//
// The parsed keys are cached; a lookup looks at the file again at most once per
// interval, and re-reads it only when it is another file (renamed over the old
// one) or its size or mtime changed. A missing file means no scoped keys; a
// file that cannot be read or parsed is logged (once per change) and the keys
// read before stay in force.
type scopedKeysFile struct {
	path     string
	mainKey  string        // access key of the main pair: never a scoped key
	interval time.Duration // minimum time between two looks at the file
	now      func() time.Time
	logf     func(format string, args ...any)

	mu      sync.Mutex
	checked time.Time   // when the file was last looked at (zero: never)
	read    os.FileInfo // the file version last read (nil: none, or missing)
	missing bool        // the file was missing at the last look
	lastErr string      // last open/stat/read error logged, to log it once
	keys    map[string]ScopedKey
}

func newScopedKeysFile(path, mainKey string, interval time.Duration, logf func(string, ...any)) *scopedKeysFile {
	s := &scopedKeysFile{path: path, mainKey: mainKey, interval: interval, now: time.Now, logf: logf}
	s.lookup("") // load now, so that the start-up log says what was found
	return s
}

func (s *scopedKeysFile) lookup(accessKey string) (ScopedKey, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if now := s.now(); s.checked.IsZero() || now.Sub(s.checked) >= s.interval {
		s.checked = now
		s.refresh()
	}
	k, ok := s.keys[accessKey]
	return k, ok
}

// refresh looks at the file and re-reads it if it changed. s.mu is held.
func (s *scopedKeysFile) refresh() {
	f, err := os.Open(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		if !s.missing {
			s.logf("scoped keys file %s does not exist: no scoped keys", s.path)
		}
		s.missing, s.read, s.keys, s.lastErr = true, nil, nil, ""
		return
	}
	s.missing = false
	if err != nil {
		s.logErr(err)
		return
	}
	defer f.Close()
	// The version read is the open file's: if the path is renamed over or
	// written to after this, the next look sees another file or size/mtime.
	info, err := f.Stat()
	if err != nil {
		s.logErr(err)
		return
	}
	if s.read != nil && os.SameFile(s.read, info) && s.read.Size() == info.Size() &&
		s.read.ModTime().Equal(info.ModTime()) {
		return
	}
	data, err := io.ReadAll(f)
	if err != nil {
		s.logErr(err)
		return
	}
	s.lastErr = ""
	s.read = info // parsed or not, this version has been dealt with
	keys, err := s.parse(data)
	if err != nil {
		s.logf("scoped keys file %s is malformed, keeping the %d scoped keys read before: %v",
			s.path, len(s.keys), err)
		return
	}
	s.keys = keys
	s.logf("scoped keys file %s: %d scoped keys", s.path, len(keys))
}

func (s *scopedKeysFile) logErr(err error) {
	if msg := err.Error(); msg != s.lastErr {
		s.lastErr = msg
		s.logf("scoped keys file %s: %v; keeping the %d scoped keys read before", s.path, err, len(s.keys))
	}
}

// parse decodes the file and drops (with a log line) entries that cannot be
// used. Unknown fields are allowed, for whoever writes the file.
func (s *scopedKeysFile) parse(data []byte) (map[string]ScopedKey, error) {
	var entries []ScopedKey
	if err := json.Unmarshal(data, &entries); err != nil {
		return nil, err
	}
	keys := make(map[string]ScopedKey, len(entries))
	for i, e := range entries {
		if why := s.unusable(e, keys); why != "" {
			s.logf("scoped keys file %s: entry %d (accessKey %q) ignored: %s", s.path, i, e.AccessKey, why)
			continue
		}
		if !strings.HasSuffix(e.Prefix, "/") {
			s.logf("scoped keys file %s: entry %d (accessKey %q): prefix %q does not end in '/', so it also matches longer names",
				s.path, i, e.AccessKey, e.Prefix)
		}
		keys[e.AccessKey] = e
	}
	return keys, nil
}

func (s *scopedKeysFile) unusable(e ScopedKey, seen map[string]ScopedKey) string {
	switch {
	case e.AccessKey == "":
		return "empty accessKey"
	case e.SecretKey == "":
		return "empty secretKey"
	case e.Prefix == "":
		return "empty prefix"
	case e.AccessKey == s.mainKey:
		return "it is the main access key (DSJOBS_S3_ACCESS_KEY), which has full access"
	case strings.HasPrefix(e.Prefix, "/") || strings.Contains(e.Prefix, "//") || hasDotSegment(e.Prefix):
		return fmt.Sprintf("prefix %q is not a plain key prefix (leading '/', '//', '.' or '..' segment)", e.Prefix)
	}
	if _, dup := seen[e.AccessKey]; dup {
		return "duplicate accessKey (the first entry wins)"
	}
	return ""
}
