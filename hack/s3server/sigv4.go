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

// Credentials is the single key pair the dev S3 accepts.
type Credentials struct {
	AccessKey string
	SecretKey string
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

// verifySigV4 rejects any request that is not signed with creds. Only the
// signature over the request line and signed headers is checked; payload
// hashes are taken as declared (real S3 checks them, but a dev server gains
// nothing from re-hashing gigabytes).
func verifySigV4(creds Credentials, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := checkSigV4(creds, r, time.Now()); err != nil {
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

func checkSigV4(creds Credentials, r *http.Request, now time.Time) *authError {
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
	if p.accessKey != creds.AccessKey {
		return denied("InvalidAccessKeyId", "the AWS access key Id you provided does not exist in our records")
	}
	canonical := canonicalRequest(r, p, presign)
	sts := strings.Join([]string{sigAlgorithm, p.amzDate, p.scope, sha256Hex([]byte(canonical))}, "\n")
	want := hex.EncodeToString(hmacSHA256(signingKey(creds.SecretKey, p.scope), []byte(sts)))
	if !hmac.Equal([]byte(want), []byte(p.signature)) {
		return denied("SignatureDoesNotMatch",
			"the request signature we calculated does not match the signature you provided; canonical request:\n%s", canonical)
	}
	return nil
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
