package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// dechunk turns aws-chunked request bodies (SDKs send them for streaming
// uploads, with per-chunk signatures or trailing checksums) into plain bodies.
// gofakes3 only understands one of the variants and only for PutObject, not
// for UploadPart; decoding here covers all of them. It runs after SigV4
// verification, which must see the headers as the client signed them.
func dechunk(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sha := r.Header.Get("X-Amz-Content-Sha256")
		enc := r.Header.Get("Content-Encoding")
		if !strings.HasPrefix(sha, "STREAMING-") && !strings.Contains(enc, "aws-chunked") {
			next.ServeHTTP(w, r)
			return
		}
		decoded := r.Header.Get("X-Amz-Decoded-Content-Length")
		n, err := strconv.ParseInt(decoded, 10, 64)
		if err != nil || n < 0 {
			(&authError{status: http.StatusLengthRequired, Code: "MissingContentLength",
				Message: "aws-chunked upload without a valid x-amz-decoded-content-length"}).write(w)
			return
		}
		r.Body = &chunkedBody{r: bufio.NewReaderSize(r.Body, 64<<10), closer: r.Body}
		r.ContentLength = n
		r.Header.Set("Content-Length", decoded)
		r.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
		r.Header.Del("X-Amz-Decoded-Content-Length")
		r.Header.Del("X-Amz-Trailer")
		// The encoding is transport framing, not a property of the object.
		var keep []string
		for _, e := range strings.Split(enc, ",") {
			if e = strings.TrimSpace(e); e != "" && e != "aws-chunked" {
				keep = append(keep, e)
			}
		}
		if len(keep) == 0 {
			r.Header.Del("Content-Encoding")
		} else {
			r.Header.Set("Content-Encoding", strings.Join(keep, ","))
		}
		next.ServeHTTP(w, r)
	})
}

// chunkedBody reads "<hex-size>[;ext]\r\n<data>\r\n ... 0[;ext]\r\n[trailers]\r\n".
type chunkedBody struct {
	r      *bufio.Reader
	closer io.Closer
	left   int64 // bytes left in the current chunk
	done   bool
}

var errBadChunk = errors.New("malformed aws-chunked body")

func (c *chunkedBody) Read(p []byte) (int, error) {
	if c.done {
		return 0, io.EOF
	}
	if c.left == 0 {
		line, err := c.r.ReadString('\n')
		if err != nil {
			return 0, fmt.Errorf("%w: %v", errBadChunk, err)
		}
		sizeHex, _, _ := strings.Cut(strings.TrimRight(line, "\r\n"), ";")
		size, err := strconv.ParseInt(strings.TrimSpace(sizeHex), 16, 64)
		if err != nil || size < 0 {
			return 0, fmt.Errorf("%w: chunk header %q", errBadChunk, line)
		}
		if size == 0 {
			// Trailers (checksums) up to an empty line; their values are not
			// verified, like the payload hash.
			for {
				t, err := c.r.ReadString('\n')
				if strings.TrimRight(t, "\r\n") == "" || err != nil {
					break
				}
			}
			c.done = true
			return 0, io.EOF
		}
		c.left = size
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	if c.left == 0 && err == nil {
		// Consume the CRLF that ends the chunk data.
		if _, err := c.r.Discard(2); err != nil {
			return n, fmt.Errorf("%w: %v", errBadChunk, err)
		}
	}
	if err == io.EOF && (c.left > 0 || !c.done) {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (c *chunkedBody) Close() error { return c.closer.Close() }
