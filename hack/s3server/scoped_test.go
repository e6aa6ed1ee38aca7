package main

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// The signing helpers below build SigV4 requests from the specification
// independently of canonicalRequest, so that they also check it.

var (
	mainKey = Credentials{AccessKey: "MAINKEY", SecretKey: "main-secret"}
	p1Key   = ScopedKey{AccessKey: "P1KEY", SecretKey: "p1-secret", Prefix: "projects/p1/"}
	testNow = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
)

const testHost = "s3.test:9000"

// staticKeys is a scopedKeyLookup over a fixed set of keys.
type staticKeys map[string]ScopedKey

func (s staticKeys) lookup(accessKey string) (ScopedKey, bool) {
	k, ok := s[accessKey]
	return k, ok
}

// awsEscape is SigV4's UriEncode for query names and values.
func awsEscape(s string) string {
	return strings.ReplaceAll(url.QueryEscape(s), "+", "%20")
}

func testCanonicalQuery(q url.Values) string {
	var pairs []string
	for k, vs := range q {
		for _, v := range vs {
			pairs = append(pairs, awsEscape(k)+"="+awsEscape(v))
		}
	}
	sort.Strings(pairs)
	return strings.Join(pairs, "&")
}

func testSignature(secret, method, rawPath, query, headers, signed, payload, amzDate, scope string) string {
	canonical := strings.Join([]string{method, rawPath, query, headers, signed, payload}, "\n")
	sts := strings.Join([]string{sigAlgorithm, amzDate, scope, sha256Hex([]byte(canonical))}, "\n")
	key := hmacSHA256([]byte("AWS4"+secret), []byte(scope[:8]))
	for _, part := range strings.Split(scope, "/")[1:] {
		key = hmacSHA256(key, []byte(part))
	}
	return fmt.Sprintf("%x", hmacSHA256(key, []byte(sts)))
}

// signedRequest builds a request signed in the Authorization header. target
// is the request line's path and query, already encoded as a client sends it.
func signedRequest(method, target, accessKey, secret string, hdr map[string]string) *http.Request {
	r := httptest.NewRequest(method, target, nil)
	r.Host = testHost
	amzDate := testNow.Format(amzDateFormat)
	r.Header.Set("X-Amz-Date", amzDate)
	r.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	names := []string{"host", "x-amz-content-sha256", "x-amz-date"}
	for k := range hdr {
		names = append(names, strings.ToLower(k))
	}
	sort.Strings(names)
	var headers strings.Builder
	for _, n := range names {
		v := testHost
		if n != "host" {
			v = r.Header.Get(n)
		}
		fmt.Fprintf(&headers, "%s:%s\n", n, v)
	}
	rawPath, rawQuery, _ := strings.Cut(target, "?")
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		panic(err)
	}
	scope := testNow.Format("20060102") + "/us-east-1/s3/aws4_request"
	signed := strings.Join(names, ";")
	sig := testSignature(secret, method, rawPath, testCanonicalQuery(q), headers.String(), signed,
		"UNSIGNED-PAYLOAD", amzDate, scope)
	r.Header.Set("Authorization", fmt.Sprintf("%s Credential=%s/%s, SignedHeaders=%s, Signature=%s",
		sigAlgorithm, accessKey, scope, signed, sig))
	return r
}

// presignedRequest builds a request for a presigned URL (host signed only).
func presignedRequest(method, target, accessKey, secret string) *http.Request {
	rawPath, rawQuery, _ := strings.Cut(target, "?")
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		panic(err)
	}
	amzDate := testNow.Format(amzDateFormat)
	scope := testNow.Format("20060102") + "/us-east-1/s3/aws4_request"
	q.Set("X-Amz-Algorithm", sigAlgorithm)
	q.Set("X-Amz-Credential", accessKey+"/"+scope)
	q.Set("X-Amz-Date", amzDate)
	q.Set("X-Amz-Expires", "3600")
	q.Set("X-Amz-SignedHeaders", "host")
	query := testCanonicalQuery(q)
	sig := testSignature(secret, method, rawPath, query, "host:"+testHost+"\n", "host",
		"UNSIGNED-PAYLOAD", amzDate, scope)
	r := httptest.NewRequest(method, rawPath+"?"+query+"&X-Amz-Signature="+sig, nil)
	r.Host = testHost
	return r
}

func TestTestSignerMatchesAWSVector(t *testing.T) {
	// The signer's key derivation and string to sign, against the AWS
	// documentation's presigned GET example.
	got := testSignature(docCreds.SecretKey, "GET", "/test.txt",
		"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"+
			"&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host",
		"host:examplebucket.s3.amazonaws.com\n", "host", "UNSIGNED-PAYLOAD", "20130524T000000Z",
		"20130524/us-east-1/s3/aws4_request")
	if want := "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"; got != want {
		t.Fatalf("test signer: got %s, want %s", got, want)
	}
}

func TestScopedKeyAuthorization(t *testing.T) {
	keys := staticKeys{p1Key.AccessKey: p1Key}
	type tc struct {
		name    string
		method  string
		target  string
		hdr     map[string]string
		allowed bool
	}
	cases := []tc{
		// One object.
		{"get inside", "GET", "/dsjobs/projects/p1/inputs/a.csv", nil, true},
		{"head inside", "HEAD", "/dsjobs/projects/p1/inputs/a.csv", nil, true},
		{"put inside", "PUT", "/dsjobs/projects/p1/out/model.bin", nil, true},
		{"delete inside", "DELETE", "/dsjobs/projects/p1/out/model.bin", nil, true},
		{"encoded key inside", "GET", "/dsjobs/projects/p1/a%20b%2Bc.txt", nil, true},
		{"other bucket inside", "GET", "/other/projects/p1/x", nil, true},
		{"get version inside", "GET", "/dsjobs/projects/p1/x?versionId=v1", nil, true},
		{"get outside", "GET", "/dsjobs/projects/p2/inputs/a.csv", nil, false},
		{"put outside", "PUT", "/dsjobs/projects/p2/x", nil, false},
		{"put top level", "PUT", "/dsjobs/x", nil, false},
		{"sibling prefix", "GET", "/dsjobs/projects/p10/x", nil, false},
		{"prefix without slash", "GET", "/dsjobs/projects/p1", nil, false},
		{"dotdot escape", "GET", "/dsjobs/projects/p1/../p2/x", nil, false},
		{"dotdot escape put", "PUT", "/dsjobs/projects/p1/../p2/x", nil, false},
		{"encoded dotdot", "GET", "/dsjobs/projects/p1/%2E%2E/p2/x", nil, false},
		{"encoded slashes dotdot", "GET", "/dsjobs/projects/p1%2F..%2Fp2%2Fx", nil, false},
		{"trailing dotdot", "DELETE", "/dsjobs/projects/p1/..", nil, false},
		{"dot segment", "GET", "/dsjobs/projects/p1/./x", nil, false},
		{"dotdot bucket", "GET", "/../projects/p1/x", nil, false},
		{"dot bucket", "GET", "/./projects/p1/x", nil, false},
		{"empty bucket", "GET", "//projects/p1/x", nil, false},
		// Multipart uploads.
		{"initiate inside", "POST", "/dsjobs/projects/p1/big?uploads", nil, true},
		{"upload part inside", "PUT", "/dsjobs/projects/p1/big?partNumber=1&uploadId=u1", nil, true},
		{"complete inside", "POST", "/dsjobs/projects/p1/big?uploadId=u1", nil, true},
		{"abort inside", "DELETE", "/dsjobs/projects/p1/big?uploadId=u1", nil, true},
		{"list parts inside", "GET", "/dsjobs/projects/p1/big?uploadId=u1", nil, true},
		{"initiate outside", "POST", "/dsjobs/projects/p2/big?uploads", nil, false},
		{"upload part outside", "PUT", "/dsjobs/projects/p2/big?partNumber=1&uploadId=u1", nil, false},
		{"upload part on bucket", "PUT", "/dsjobs?partNumber=1&uploadId=u1", nil, false},
		// Copies.
		{"copy inside", "PUT", "/dsjobs/projects/p1/copy", map[string]string{"X-Amz-Copy-Source": "dsjobs/projects/p1/src"}, true},
		{"copy inside, leading slash", "PUT", "/dsjobs/projects/p1/copy", map[string]string{"X-Amz-Copy-Source": "/dsjobs/projects/p1/a%20b?versionId=1"}, true},
		{"copy from outside", "PUT", "/dsjobs/projects/p1/copy", map[string]string{"X-Amz-Copy-Source": "/dsjobs/projects/p2/secret"}, false},
		{"copy from outside, encoded", "PUT", "/dsjobs/projects/p1/copy", map[string]string{"X-Amz-Copy-Source": "dsjobs%2Fprojects%2Fp2%2Fsecret"}, false},
		{"copy from dotdot", "PUT", "/dsjobs/projects/p1/copy", map[string]string{"X-Amz-Copy-Source": "dsjobs/projects/p1/%2E%2E/p2/x"}, false},
		{"copy without key", "PUT", "/dsjobs/projects/p1/copy", map[string]string{"X-Amz-Copy-Source": "dsjobs"}, false},
		// Listings.
		{"list v2 inside", "GET", "/dsjobs?list-type=2&prefix=projects%2Fp1%2F", nil, true},
		{"list v2 deeper", "GET", "/dsjobs/?delimiter=%2F&encoding-type=url&list-type=2&prefix=projects%2Fp1%2Fout%2F", nil, true},
		{"list v2 continuation", "GET", "/dsjobs?continuation-token=abc&list-type=2&prefix=projects%2Fp1%2F", nil, true},
		{"list v1 inside", "GET", "/dsjobs?prefix=projects/p1/", nil, true},
		{"list uploads inside", "GET", "/dsjobs?uploads&prefix=projects%2Fp1%2F", nil, true},
		{"list versions inside", "GET", "/dsjobs?versions&prefix=projects%2Fp1%2F", nil, true},
		{"list v2 outside", "GET", "/dsjobs?list-type=2&prefix=projects%2Fp2%2F", nil, false},
		{"list v2 parent", "GET", "/dsjobs?list-type=2&prefix=projects%2F", nil, false},
		{"list v2 sibling", "GET", "/dsjobs?list-type=2&prefix=projects%2Fp10", nil, false},
		{"list v2 no prefix", "GET", "/dsjobs?list-type=2", nil, false},
		{"list v2 empty prefix", "GET", "/dsjobs?list-type=2&prefix=", nil, false},
		{"list v1 no prefix", "GET", "/dsjobs", nil, false},
		{"list v2 dotdot", "GET", "/dsjobs?delimiter=%2F&list-type=2&prefix=projects%2Fp1%2F..%2F..%2F", nil, false},
		{"list uploads no prefix", "GET", "/dsjobs?uploads", nil, false},
		{"list uploads via object path", "GET", "/dsjobs/projects/p1/x?uploads", nil, false},
		{"list versions via object path", "GET", "/dsjobs/projects/p1/x?versions", nil, false},
		{"list versions outside", "GET", "/dsjobs?versions&prefix=projects%2Fp2%2F", nil, false},
		// Buckets and the service.
		{"list buckets", "GET", "/", nil, false},
		{"head bucket", "HEAD", "/dsjobs", nil, false},
		{"create bucket", "PUT", "/newbucket", nil, false},
		{"delete bucket", "DELETE", "/dsjobs", nil, false},
		{"multi-object delete", "POST", "/dsjobs?delete", nil, false},
		{"browser upload", "POST", "/dsjobs", nil, false},
		{"bucket location", "GET", "/dsjobs?location&prefix=projects%2Fp1%2F", nil, false},
		{"bucket versioning", "PUT", "/dsjobs?versioning", nil, false},
		{"bucket versioning via object", "PUT", "/dsjobs/projects/p1/x?versioning", nil, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			check := func(form string, r *http.Request) {
				t.Helper()
				err := checkAuth(mainKey, keys, r, testNow)
				switch {
				case c.allowed && err != nil:
					t.Errorf("%s: denied: %s %s", form, err.Code, err.Message)
				case !c.allowed && err == nil:
					t.Errorf("%s: allowed", form)
				case !c.allowed && (err.Code != "AccessDenied" || err.status != http.StatusForbidden ||
					!strings.Contains(err.Message, p1Key.AccessKey) || !strings.Contains(err.Message, p1Key.Prefix)):
					t.Errorf("%s: got %d %s %q, want 403 AccessDenied naming key and prefix",
						form, err.status, err.Code, err.Message)
				}
				// The main key may do anything.
				if err := checkAuth(mainKey, keys, signedRequest(c.method, c.target, mainKey.AccessKey, mainKey.SecretKey, c.hdr), testNow); err != nil {
					t.Errorf("main key denied: %s %s", err.Code, err.Message)
				}
			}
			check("header", signedRequest(c.method, c.target, p1Key.AccessKey, p1Key.SecretKey, c.hdr))
			if c.hdr == nil {
				check("presigned", presignedRequest(c.method, c.target, p1Key.AccessKey, p1Key.SecretKey))
			}
		})
	}
}

func TestScopedKeySignatureErrors(t *testing.T) {
	keys := staticKeys{p1Key.AccessKey: p1Key}
	for _, r := range []*http.Request{
		signedRequest("GET", "/dsjobs/projects/p1/x", p1Key.AccessKey, "wrong", nil),
		presignedRequest("GET", "/dsjobs/projects/p1/x", p1Key.AccessKey, "wrong"),
		// The main secret is no good for a scoped access key, and vice versa.
		signedRequest("GET", "/dsjobs/projects/p1/x", p1Key.AccessKey, mainKey.SecretKey, nil),
		signedRequest("GET", "/dsjobs/projects/p1/x", mainKey.AccessKey, p1Key.SecretKey, nil),
	} {
		if err := checkAuth(mainKey, keys, r, testNow); err == nil || err.Code != "SignatureDoesNotMatch" {
			t.Errorf("%s %s: got %+v, want SignatureDoesNotMatch", r.Method, r.URL, err)
		}
	}
	// Out of scope with a bad signature: the signature error, which says
	// nothing about the key's prefix.
	r := signedRequest("GET", "/dsjobs/projects/p2/x", p1Key.AccessKey, "wrong", nil)
	if err := checkAuth(mainKey, keys, r, testNow); err == nil || err.Code != "SignatureDoesNotMatch" {
		t.Errorf("got %+v, want SignatureDoesNotMatch", err)
	}
	r = signedRequest("GET", "/dsjobs/projects/p1/x", "NOSUCHKEY", "whatever", nil)
	if err := checkAuth(mainKey, keys, r, testNow); err == nil || err.Code != "InvalidAccessKeyId" {
		t.Errorf("unknown key: got %+v, want InvalidAccessKeyId", err)
	}
	// Without scoped keys, a scoped key is unknown.
	r = signedRequest("GET", "/dsjobs/projects/p1/x", p1Key.AccessKey, p1Key.SecretKey, nil)
	if err := checkSigV4(mainKey, r, testNow); err == nil || err.Code != "InvalidAccessKeyId" {
		t.Errorf("no scoped keys: got %+v, want InvalidAccessKeyId", err)
	}
	// An expired presigned URL of a scoped key is expired.
	r = presignedRequest("GET", "/dsjobs/projects/p1/x", p1Key.AccessKey, p1Key.SecretKey)
	if err := checkAuth(mainKey, keys, r, testNow.Add(2*time.Hour)); err == nil || err.Message != "Request has expired" {
		t.Errorf("expired: got %+v", err)
	}
}

func TestScopedKeyDeniedResponse(t *testing.T) {
	var reached int
	h := verifySigV4(Credentials{AccessKey: mainKey.AccessKey, SecretKey: mainKey.SecretKey},
		staticKeys{p1Key.AccessKey: p1Key},
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { reached++ }))
	// verifySigV4 checks against the wall clock: sign with the present time.
	old := testNow
	testNow = time.Now().UTC()
	defer func() { testNow = old }()

	w := httptest.NewRecorder()
	h.ServeHTTP(w, signedRequest("GET", "/dsjobs/projects/p2/x", p1Key.AccessKey, p1Key.SecretKey, nil))
	body := w.Body.String()
	if w.Code != http.StatusForbidden || reached != 0 ||
		!strings.Contains(body, "<Error><Code>AccessDenied</Code><Message>") ||
		!strings.Contains(body, p1Key.AccessKey) || !strings.Contains(body, "projects/p1/") {
		t.Fatalf("got %d reached=%d %s", w.Code, reached, body)
	}
	w = httptest.NewRecorder()
	h.ServeHTTP(w, signedRequest("GET", "/dsjobs/projects/p1/x", p1Key.AccessKey, p1Key.SecretKey, nil))
	if w.Code != http.StatusOK || reached != 1 {
		t.Fatalf("allowed request: got %d reached=%d %s", w.Code, reached, w.Body)
	}
}

// fakeClock is a settable clock for scopedKeysFile.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time { return c.t }

type logSink struct {
	mu    sync.Mutex
	lines []string
}

func (l *logSink) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func (l *logSink) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			n++
		}
	}
	return n
}

// writeAtomically writes the file as the other process does: a temp file,
// then a rename over the old one.
func writeAtomically(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestScopedKeysFileReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "scoped-keys.json")
	clock := &fakeClock{t: testNow}
	logs := &logSink{}
	s := &scopedKeysFile{path: path, mainKey: mainKey.AccessKey, interval: time.Second, now: clock.now, logf: logs.logf}
	has := func(ak string) bool { _, ok := s.lookup(ak); return ok }
	tick := func() { clock.t = clock.t.Add(1100 * time.Millisecond) }

	// Missing at start: no scoped keys, said once.
	if has("A") {
		t.Fatal("key found without a file")
	}
	tick()
	has("A")
	if n := logs.count("does not exist"); n != 1 {
		t.Fatalf("missing file logged %d times", n)
	}

	writeAtomically(t, path, `[{"accessKey": "A", "secretKey": "sa", "prefix": "projects/a/"}]`)
	if has("A") {
		t.Fatal("file looked at again within the interval")
	}
	tick()
	if k, ok := s.lookup("A"); !ok || k.SecretKey != "sa" || k.Prefix != "projects/a/" {
		t.Fatalf("A after the file appeared: %+v %v", k, ok)
	}

	// Another project appended: the same size would not do, a new file does.
	writeAtomically(t, path, `[{"accessKey": "A", "secretKey": "sa", "prefix": "projects/a/"},
		{"accessKey": "B", "secretKey": "sb", "prefix": "projects/b/", "project": "b"}]`)
	if has("B") {
		t.Fatal("B found within the interval")
	}
	tick()
	if !has("A") || !has("B") {
		t.Fatal("A and B not both found after the rewrite")
	}

	// A file of the same size, renamed over: re-read although size and (maybe) mtime agree.
	writeAtomically(t, path, `[{"accessKey": "A", "secretKey": "sa", "prefix": "projects/a/"},
		{"accessKey": "C", "secretKey": "sc", "prefix": "projects/c/", "project": "c"}]`)
	tick()
	if has("B") || !has("C") {
		t.Fatal("same-size replacement not re-read")
	}

	// Malformed: logged once, the previous keys stay.
	writeAtomically(t, path, `[{"accessKey": "D", `)
	tick()
	if !has("A") || !has("C") || has("D") {
		t.Fatal("malformed file changed the keys")
	}
	tick()
	has("A")
	tick()
	has("A")
	if n := logs.count("malformed"); n != 1 {
		t.Fatalf("malformed file logged %d times, want once", n)
	}
	writeAtomically(t, path, `{"accessKey": "D"}`) // another malformed version: logged again
	tick()
	if !has("A") || logs.count("malformed") != 2 {
		t.Fatalf("second malformed version: A=%v logs=%d", has("A"), logs.count("malformed"))
	}

	// Unusable entries are dropped, with a log line each.
	writeAtomically(t, path, `[
		{"accessKey": "E", "secretKey": "se", "prefix": ""},
		{"accessKey": "MAINKEY", "secretKey": "x", "prefix": "projects/m/"},
		{"accessKey": "F", "secretKey": "", "prefix": "projects/f/"},
		{"accessKey": "G", "secretKey": "sg", "prefix": "projects/../"},
		{"accessKey": "H", "secretKey": "sh", "prefix": "projects/h/"},
		{"accessKey": "H", "secretKey": "sh2", "prefix": "projects/h2/"}
	]`)
	tick()
	for _, ak := range []string{"A", "E", "MAINKEY", "F", "G"} {
		if has(ak) {
			t.Errorf("%s found", ak)
		}
	}
	if k, ok := s.lookup("H"); !ok || k.Prefix != "projects/h/" {
		t.Errorf("H: %+v %v", k, ok)
	}
	if n := logs.count("ignored"); n != 5 {
		t.Errorf("%d entries logged as ignored, want 5: %q", n, logs.lines)
	}

	// Removed: no scoped keys.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	tick()
	if has("H") {
		t.Fatal("H found after the file was removed")
	}
}

func TestScopedKeysFileEndToEnd(t *testing.T) {
	// The file store behind verifySigV4, with the wall clock and a short
	// interval: a key added to the file starts working.
	path := filepath.Join(t.TempDir(), "keys.json")
	logs := &logSink{}
	store := newScopedKeysFile(path, mainKey.AccessKey, 20*time.Millisecond, logs.logf)
	h := verifySigV4(mainKey, store, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	old := testNow
	testNow = time.Now().UTC()
	defer func() { testNow = old }()
	get := func(target string) int {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, signedRequest("GET", target, p1Key.AccessKey, p1Key.SecretKey, nil))
		return w.Code
	}
	if code := get("/dsjobs/projects/p1/x"); code != http.StatusForbidden {
		t.Fatalf("before the key exists: %d", code)
	}
	writeAtomically(t, path, `[{"accessKey": "P1KEY", "secretKey": "p1-secret", "prefix": "projects/p1/"}]`)
	time.Sleep(30 * time.Millisecond)
	if code := get("/dsjobs/projects/p1/x"); code != http.StatusOK {
		t.Fatalf("inside after the key was added: %d", code)
	}
	if code := get("/dsjobs/projects/p2/x"); code != http.StatusForbidden {
		t.Fatalf("outside after the key was added: %d", code)
	}
}
