package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Credentials is the main key pair of the dev S3: it may do anything.
type Credentials struct {
	AccessKey string
	SecretKey string
}

// ScopedKey is an extra key pair that may only touch objects whose keys start
// with Prefix (in any bucket); see authorizeScoped for what that allows.
type ScopedKey struct {
	AccessKey string `json:"accessKey"`
	SecretKey string `json:"secretKey"`
	Prefix    string `json:"prefix"`
}

// scopedKeyLookup finds the scoped key with the given access key id.
type scopedKeyLookup interface {
	lookup(accessKey string) (ScopedKey, bool)
}

const (
	sigAlgorithm    = "AWS4-HMAC-SHA256"
	amzDateFormat   = "20060102T150405Z"
	maxPresignTTL   = 7 * 24 * time.Hour // S3's own limit for X-Amz-Expires
	headerSkewLimit = 15 * time.Minute   // S3's RequestTimeTooSkewed window
)

// authError is an S3-style error document.
type authError struct {
	status  int
	Code    string `xml:"Code"`
	Message string `xml:"Message"`
}

func (e *authError) write(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(e.status)
	type doc struct {
		XMLName xml.Name `xml:"Error"`
		Code    string   `xml:"Code"`
		Message string   `xml:"Message"`
	}
	_, _ = w.Write([]byte(xml.Header))
	_ = xml.NewEncoder(w).Encode(doc{Code: e.Code, Message: e.Message})
}

func denied(code, format string, args ...any) *authError {
	return &authError{status: http.StatusForbidden, Code: code, Message: fmt.Sprintf(format, args...)}
}

// verifySigV4 rejects any request that is not signed with creds or with one
// of the scoped keys (scoped may be nil: none), and requests of a scoped key
// outside its prefix. Only the signature over the request line and signed
// headers is checked; payload hashes are taken as declared (real S3 checks
// them, but a dev server gains nothing from re-hashing gigabytes).
func verifySigV4(creds Credentials, scoped scopedKeyLookup, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := checkAuth(creds, scoped, r, time.Now()); err != nil {
			err.write(w)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// sigParams is what either auth form carries.
type sigParams struct {
	accessKey     string
	scope         string // date/region/service/aws4_request
	signedHeaders []string
	signature     string
	amzDate       string
	payloadHash   string
}

// checkSigV4 verifies a request against the main key pair only.
func checkSigV4(creds Credentials, r *http.Request, now time.Time) *authError {
	return checkAuth(creds, nil, r, now)
}

// checkAuth verifies the signature of r, made with the main key pair or with
// a scoped key, and for a scoped key then whether r stays inside its prefix.
func checkAuth(creds Credentials, scoped scopedKeyLookup, r *http.Request, now time.Time) *authError {
	q := r.URL.Query()
	var (
		p       *sigParams
		err     *authError
		presign = q.Get("X-Amz-Algorithm") != ""
	)
	if presign {
		p, err = presignParams(q, now)
	} else if auth := r.Header.Get("Authorization"); auth != "" {
		p, err = headerParams(r, auth, now)
	} else {
		return denied("AccessDenied", "anonymous access is not allowed; sign requests with SigV4")
	}
	if err != nil {
		return err
	}
	if presign {
		// As S3 does: a presigned URL's holder may not add x-amz-* headers it did not sign. An
		// unsigned x-amz-copy-source turned an input's upload URL into a copy of any object the
		// signing key can read (another project's outputs), the bucket-wide key's at that.
		if name := unsignedAmzHeader(r, p.signedHeaders); name != "" {
			return denied("AccessDenied", "There were headers present in the request which were not signed: %s", name)
		}
	}
	// The main key is looked at first, so it keeps full access whatever the
	// scoped keys file says.
	secret := creds.SecretKey
	var limited *ScopedKey
	if p.accessKey != creds.AccessKey {
		k, ok := ScopedKey{}, false
		if scoped != nil {
			k, ok = scoped.lookup(p.accessKey)
		}
		if !ok {
			return denied("InvalidAccessKeyId", "the AWS access key Id you provided does not exist in our records")
		}
		secret, limited = k.SecretKey, &k
	}
	canonical := canonicalRequest(r, p, presign)
	sts := strings.Join([]string{sigAlgorithm, p.amzDate, p.scope, sha256Hex([]byte(canonical))}, "\n")
	want := hex.EncodeToString(hmacSHA256(signingKey(secret, p.scope), []byte(sts)))
	if !hmac.Equal([]byte(want), []byte(p.signature)) {
		return denied("SignatureDoesNotMatch",
			"the request signature we calculated does not match the signature you provided; canonical request:\n%s", canonical)
	}
	if limited != nil {
		return authorizeScoped(*limited, r)
	}
	return nil
}

// unsignedAmzHeader is the first x-amz-* header of r that is not among signed
// (lowercase names), or "". x-amz-content-sha256 only declares the payload's
// hash, which clients may send with a presigned URL.
func unsignedAmzHeader(r *http.Request, signed []string) string {
	for name := range r.Header {
		lower := strings.ToLower(name)
		if !strings.HasPrefix(lower, "x-amz-") || lower == "x-amz-content-sha256" {
			continue
		}
		found := false
		for _, s := range signed {
			if s == lower {
				found = true
				break
			}
		}
		if !found {
			return lower
		}
	}
	return ""
}

// authorizeScoped decides whether a request signed with a scoped key stays
// inside key.Prefix. It mirrors gofakes3's routing (routing.go of the pinned
// v1.2.0: path-style /<bucket>/<object>, the object being everything after the
// first slash of the decoded path, and operations picked by query parameters
// in this order), so that what is checked is what gofakes3 will act on:
//
//   - an operation on one object (GET, HEAD, PUT, DELETE, multipart initiate,
//     upload part, complete, abort, list parts, versions of an object): the
//     object key must start with the prefix; a copy (x-amz-copy-source) must
//     also read from a key under the prefix;
//   - a listing (ListObjects/V2, ListObjectVersions, ListMultipartUploads):
//     its prefix query parameter must start with the prefix;
//   - anything else (ListBuckets, bucket HEAD/PUT/DELETE, multi-object delete,
//     browser POST uploads, bucket location/versioning) is denied.
//
// A bucket, object key, listing prefix or copy source that has an empty bucket
// or a "." or ".." segment is denied too: the filesystem backend cleans paths,
// so such a key could land outside the prefix.
func authorizeScoped(key ScopedKey, r *http.Request) *authError {
	deny := func(why string) *authError {
		return denied("AccessDenied", "access key %s may only access objects under the prefix %q: %s",
			key.AccessKey, key.Prefix, why)
	}
	inScope := func(k string) bool {
		return strings.HasPrefix(k, key.Prefix) && !hasDotSegment(k)
	}
	bucket, object, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	if bucket == "" || bucket == "." || bucket == ".." {
		return deny("the request is not about one bucket")
	}
	q := r.URL.Query()
	objectOp := func() *authError {
		if object == "" {
			return deny("the request is not about one object")
		}
		if !inScope(object) {
			return deny(fmt.Sprintf("object key %q is outside", object))
		}
		if src := r.Header.Get("X-Amz-Copy-Source"); src != "" {
			srcBucket, srcKey, ok := copySource(src)
			if !ok || srcBucket == "" || srcBucket == "." || srcBucket == ".." || !inScope(srcKey) {
				return deny(fmt.Sprintf("copy source %q is outside", src))
			}
		}
		return nil
	}
	listing := func() *authError {
		if r.Method != http.MethodGet {
			return deny("only GET may list")
		}
		if _, ok := q["prefix"]; !ok {
			return deny("a listing needs a prefix query parameter")
		}
		if prefix := q.Get("prefix"); !inScope(prefix) {
			return deny(fmt.Sprintf("listing prefix %q is outside", prefix))
		}
		return nil
	}
	_, uploads := q["uploads"]
	_, versions := q["versions"]
	_, versioning := q["versioning"]
	switch {
	case q.Get("uploadId") != "": // UploadPart, CompleteMultipartUpload, ListParts, Abort
		return objectOp()
	case uploads:
		if r.Method == http.MethodGet { // ListMultipartUploads, whatever the path says
			return listing()
		}
		return objectOp() // CreateMultipartUpload
	case versioning:
		return deny("bucket versioning is not an object operation")
	case versions: // ListObjectVersions
		return listing()
	case q.Get("versionId") != "" && q.Get("versionId") != "null": // one version of an object
		return objectOp()
	case object != "":
		return objectOp()
	default: // bucket level
		if _, location := q["location"]; r.Method == http.MethodGet && !location {
			return listing()
		}
		return deny(r.Method + " on a bucket is not an object operation")
	}
}

// copySource splits an x-amz-copy-source header the way gofakes3's copyObject
// does: "bucket/key" or "/bucket/key", the key URL-encoded and optionally
// followed by "?versionId=...", or the whole value URL-encoded.
func copySource(src string) (bucket, key string, ok bool) {
	parts := strings.SplitN(strings.TrimPrefix(src, "/"), "/", 2)
	decoded := false
	if len(parts) < 2 {
		d, err := url.QueryUnescape(src)
		if err != nil {
			return "", "", false
		}
		parts = strings.SplitN(strings.TrimPrefix(d, "/"), "/", 2)
		decoded = true
	}
	if len(parts) < 2 {
		return "", "", false
	}
	key = strings.SplitN(parts[1], "?", 2)[0]
	if !decoded {
		var err error
		if key, err = url.QueryUnescape(key); err != nil {
			return "", "", false
		}
	}
	return parts[0], key, true
}

// hasDotSegment reports whether the slash-separated s has a "." or ".."
// segment.
func hasDotSegment(s string) bool {
	for _, seg := range strings.Split(s, "/") {
		if seg == "." || seg == ".." {
			return true
		}
	}
	return false
}

func presignParams(q url.Values, now time.Time) (*sigParams, *authError) {
	if q.Get("X-Amz-Algorithm") != sigAlgorithm {
		return nil, denied("AuthorizationQueryParametersError", "X-Amz-Algorithm must be %s", sigAlgorithm)
	}
	accessKey, scope, ok := strings.Cut(q.Get("X-Amz-Credential"), "/")
	if !ok || strings.Count(scope, "/") != 3 {
		return nil, denied("AuthorizationQueryParametersError", "malformed X-Amz-Credential")
	}
	date, err := time.Parse(amzDateFormat, q.Get("X-Amz-Date"))
	if err != nil {
		return nil, denied("AuthorizationQueryParametersError", "malformed X-Amz-Date")
	}
	expires, err := strconv.Atoi(q.Get("X-Amz-Expires"))
	if err != nil || expires < 0 || time.Duration(expires)*time.Second > maxPresignTTL {
		return nil, denied("AuthorizationQueryParametersError", "X-Amz-Expires must be 0..604800")
	}
	if now.After(date.Add(time.Duration(expires) * time.Second)) {
		return nil, denied("AccessDenied", "Request has expired")
	}
	if now.Add(headerSkewLimit).Before(date) {
		return nil, denied("AccessDenied", "Request is not valid yet")
	}
	payload := q.Get("X-Amz-Content-Sha256")
	if payload == "" {
		payload = "UNSIGNED-PAYLOAD"
	}
	return &sigParams{
		accessKey:     accessKey,
		scope:         scope,
		signedHeaders: strings.Split(q.Get("X-Amz-SignedHeaders"), ";"),
		signature:     q.Get("X-Amz-Signature"),
		amzDate:       q.Get("X-Amz-Date"),
		payloadHash:   payload,
	}, nil
}

func headerParams(r *http.Request, auth string, now time.Time) (*sigParams, *authError) {
	rest, ok := strings.CutPrefix(auth, sigAlgorithm+" ")
	if !ok {
		return nil, denied("AccessDenied", "only %s authorization is supported", sigAlgorithm)
	}
	p := &sigParams{}
	for _, field := range strings.Split(rest, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(field), "=")
		switch k {
		case "Credential":
			var scope string
			p.accessKey, scope, _ = strings.Cut(v, "/")
			p.scope = scope
		case "SignedHeaders":
			p.signedHeaders = strings.Split(v, ";")
		case "Signature":
			p.signature = v
		}
	}
	if p.accessKey == "" || strings.Count(p.scope, "/") != 3 || p.signature == "" || len(p.signedHeaders) == 0 {
		return nil, denied("AuthorizationHeaderMalformed", "malformed Authorization header")
	}
	p.amzDate = r.Header.Get("X-Amz-Date")
	date, err := time.Parse(amzDateFormat, p.amzDate)
	if err != nil {
		return nil, denied("AccessDenied", "missing or malformed X-Amz-Date header")
	}
	if d := now.Sub(date); d > headerSkewLimit || d < -headerSkewLimit {
		return nil, &authError{status: http.StatusForbidden, Code: "RequestTimeTooSkewed",
			Message: "the difference between the request time and the current time is too large"}
	}
	p.payloadHash = r.Header.Get("X-Amz-Content-Sha256")
	if p.payloadHash == "" {
		return nil, &authError{status: http.StatusBadRequest, Code: "InvalidRequest",
			Message: "missing required header for this request: x-amz-content-sha256"}
	}
	return p, nil
}

// canonicalRequest follows the S3 flavour of SigV4: the path is used exactly
// as the client sent it (no normalisation, no double encoding).
func canonicalRequest(r *http.Request, p *sigParams, presign bool) string {
	rawPath := r.RequestURI
	if i := strings.IndexByte(rawPath, '?'); i >= 0 {
		rawPath = rawPath[:i]
	}
	if u, err := url.Parse(rawPath); err == nil && u.IsAbs() { // proxy-style request line
		rawPath = u.EscapedPath()
	}
	if rawPath == "" {
		rawPath = "/"
	}

	var headers strings.Builder
	for _, name := range p.signedHeaders {
		headers.WriteString(name)
		headers.WriteByte(':')
		headers.WriteString(headerValue(r, name))
		headers.WriteByte('\n')
	}
	return strings.Join([]string{
		r.Method,
		rawPath,
		canonicalQuery(r.URL.RawQuery, presign),
		headers.String(),
		strings.Join(p.signedHeaders, ";"),
		p.payloadHash,
	}, "\n")
}

func headerValue(r *http.Request, name string) string {
	switch name {
	case "host":
		return r.Host
	case "content-length":
		if v := r.Header.Get("Content-Length"); v != "" {
			return v
		}
		return strconv.FormatInt(r.ContentLength, 10)
	}
	vals := r.Header.Values(name)
	out := make([]string, len(vals))
	for i, v := range vals {
		out[i] = strings.Join(strings.Fields(v), " ")
	}
	return strings.Join(out, ",")
}

func canonicalQuery(raw string, presign bool) string {
	type kv struct{ k, v string }
	var pairs []kv
	for _, part := range strings.Split(raw, "&") {
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		// PathUnescape, not QueryUnescape: SigV4 clients encode spaces as
		// %20 and a literal '+' must stay a plus.
		dk, err := url.PathUnescape(k)
		if err != nil {
			dk = k
		}
		dv, err := url.PathUnescape(v)
		if err != nil {
			dv = v
		}
		if presign && dk == "X-Amz-Signature" {
			continue
		}
		pairs = append(pairs, kv{uriEncode(dk), uriEncode(dv)})
	}
	sort.Slice(pairs, func(i, j int) bool {
		if pairs[i].k != pairs[j].k {
			return pairs[i].k < pairs[j].k
		}
		return pairs[i].v < pairs[j].v
	})
	out := make([]string, len(pairs))
	for i, p := range pairs {
		out[i] = p.k + "=" + p.v
	}
	return strings.Join(out, "&")
}

// uriEncode is SigV4's UriEncode: everything but A-Za-z0-9-_.~ is %XX.
func uriEncode(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if ('A' <= c && c <= 'Z') || ('a' <= c && c <= 'z') || ('0' <= c && c <= '9') ||
			c == '-' || c == '_' || c == '.' || c == '~' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func signingKey(secret, scope string) []byte {
	key := []byte("AWS4" + secret)
	for _, part := range strings.Split(scope, "/") {
		key = hmacSHA256(key, []byte(part))
	}
	return key
}

func hmacSHA256(key, data []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(data)
	return m.Sum(nil)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
