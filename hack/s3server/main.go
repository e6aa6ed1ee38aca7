// Command dsjobs-s3server is the S3 endpoint of the local dev cluster.
//
// It is gofakes3 (MIT) with its filesystem backend, plus what a realistic
// stand-in for object storage needs and gofakes3 lacks:
//   - SigV4 verification (header and presigned-URL forms), so a URL signed with
//     the wrong key, host or expiry fails here as it would on real S3;
//   - aws-chunked request bodies decoded before gofakes3 sees them;
//   - uploads spooled to disk outside the backend's global lock, and
//     multipart parts kept on disk, so 1 GiB objects never sit in RAM;
//   - unfinished multipart uploads that survive a restart, as on S3.
//
// Credentials come from the environment (DSJOBS_S3_ACCESS_KEY,
// DSJOBS_S3_SECRET_KEY) rather than flags, to keep them out of `ps`. That main
// key pair may do anything.
//
// DSJOBS_S3_SCOPED_KEYS_FILE (optional) names a JSON file of scoped keys: extra
// key pairs that may only touch objects under one key prefix, e.g. to give a
// project's job runner credentials limited to projects/<project-id>/:
//
//	[{"accessKey": "...", "secretKey": "...", "prefix": "projects/p1/"}, ...]
//
// A scoped key may read, write and delete objects whose keys start with its
// prefix (including multipart uploads and copies from under the prefix), and
// list objects or multipart uploads with a prefix query parameter that starts
// with it; nothing else (no ListBuckets, bucket HEAD/create/delete or
// multi-object delete). The prefix applies in every bucket. The file need not
// exist at start and may be replaced while the server runs (write a temp file,
// then rename it over): it is looked at again at most once a second and
// re-read when it changed. A missing file means no scoped keys; a malformed one
// is logged and the keys read before stay in force. Entries with an empty
// prefix or the main access key are ignored (and logged). With -no-auth the
// file is not used.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3afero"
)

// scopedKeysInterval is how often, at most, the scoped keys file is looked at.
const scopedKeysInterval = time.Second

func main() {
	if err := run(); err != nil {
		log.Printf("dsjobs-s3server: %v", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("addr", "127.0.0.1:9000", "listen address (host:port)")
	root := flag.String("root", "", "data directory (required)")
	buckets := flag.String("bucket", "dsjobs", "comma-separated buckets to create at start")
	noAuth := flag.Bool("no-auth", false, "accept unsigned requests (default: verify SigV4)")
	quiet := flag.Bool("quiet", false, "do not log each request")
	flag.Parse()

	if *root == "" {
		return errors.New("-root is required")
	}
	creds := Credentials{
		AccessKey: os.Getenv("DSJOBS_S3_ACCESS_KEY"),
		SecretKey: os.Getenv("DSJOBS_S3_SECRET_KEY"),
	}
	if !*noAuth && (creds.AccessKey == "" || creds.SecretKey == "") {
		return errors.New("DSJOBS_S3_ACCESS_KEY and DSJOBS_S3_SECRET_KEY must be set (or pass -no-auth)")
	}

	absRoot, err := filepath.Abs(*root)
	if err != nil {
		return err
	}
	dataFs, err := s3afero.FsPath(filepath.Join(absRoot, "data"), s3afero.FsPathCreateAll)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	inner, err := s3afero.MultiBucket(dataFs)
	if err != nil {
		return fmt.Errorf("backend: %w", err)
	}
	spoolDir := filepath.Join(absRoot, "spool")
	// Leftovers from a killed server are garbage: nothing refers to them.
	if err := os.RemoveAll(spoolDir); err != nil {
		return err
	}
	if err := os.MkdirAll(spoolDir, 0o700); err != nil {
		return err
	}
	// Unfinished multipart uploads are not garbage: S3 keeps them until they are
	// completed or aborted, and clients go on with them after an outage.
	multipartDir := filepath.Join(absRoot, "multipart")
	if err := os.MkdirAll(multipartDir, 0o700); err != nil {
		return err
	}
	backend, err := newBackend(inner, spoolDir, multipartDir)
	if err != nil {
		return fmt.Errorf("multipart uploads: %w", err)
	}

	for _, b := range strings.Split(*buckets, ",") {
		b = strings.TrimSpace(b)
		if b == "" {
			continue
		}
		if err := inner.CreateBucket(b); err != nil && !gofakes3.HasErrorCode(err, gofakes3.ErrBucketAlreadyExists) {
			return fmt.Errorf("create bucket %q: %w", b, err)
		}
	}

	faker := gofakes3.New(backend,
		gofakes3.WithIntegrityCheck(true),
		// Presigned URLs outlive the default 15 minute skew window; expiry of
		// those is checked by the SigV4 layer instead.
		gofakes3.WithTimeSkewLimit(0),
	)
	var handler http.Handler = faker.Server()
	handler = dechunk(handler)
	scopedPath := os.Getenv("DSJOBS_S3_SCOPED_KEYS_FILE")
	if *noAuth && scopedPath != "" {
		log.Printf("dsjobs-s3server: -no-auth: DSJOBS_S3_SCOPED_KEYS_FILE is not used")
	}
	if !*noAuth {
		var scoped scopedKeyLookup // nil interface, not a nil *scopedKeysFile
		if scopedPath != "" {
			scoped = newScopedKeysFile(scopedPath, creds.AccessKey, scopedKeysInterval, func(format string, args ...any) {
				log.Printf("dsjobs-s3server: "+format, args...)
			})
		}
		handler = verifySigV4(creds, scoped, handler)
	}
	handler = readyz(handler)
	if !*quiet {
		handler = accessLog(handler)
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 30 * time.Second,
	}
	log.Printf("dsjobs-s3server: listening on http://%s root=%s buckets=%s auth=%v",
		ln.Addr(), absRoot, *buckets, !*noAuth)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-errc:
		return err
	case s := <-sigs:
		log.Printf("dsjobs-s3server: %v, shutting down", s)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(ctx)
	}
}

// readyz answers GET /-/ready without authentication so launchers can poll it.
// No bucket can be named "-", so the path never shadows S3.
func readyz(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/-/ready" {
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte("ok\n"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (s *statusRecorder) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	n, err := s.ResponseWriter.Write(b)
	s.bytes += int64(n)
	return n, err
}

func accessLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		if rec.status == 0 {
			rec.status = http.StatusOK
		}
		log.Printf("%s %s %d in=%d out=%d %s", r.Method, r.URL.Path, rec.status,
			r.ContentLength, rec.bytes, time.Since(start).Round(time.Millisecond))
	})
}
