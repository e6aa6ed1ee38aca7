package main

import (
	"bufio"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// Vectors from the AWS S3 SigV4 documentation ("Examples: Signature
// Calculations in AWS Signature Version 4" and "Authenticating Requests:
// Using Query Parameters").
var docCreds = Credentials{
	AccessKey: "AKIAIOSFODNN7EXAMPLE",
	SecretKey: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
}

var docTime = time.Date(2013, 5, 24, 0, 0, 0, 0, time.UTC)

// The documentation's presigned GET of examplebucket's test.txt.
const docPresignedGet = "/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256" +
	"&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request" +
	"&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host" +
	"&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"

func TestPresignedGetVector(t *testing.T) {
	target := docPresignedGet
	r := httptest.NewRequest(http.MethodGet, target, nil)
	r.Host = "examplebucket.s3.amazonaws.com"
	if err := checkSigV4(docCreds, r, docTime.Add(time.Hour)); err != nil {
		t.Fatalf("valid presigned URL rejected: %s %s", err.Code, err.Message)
	}
	if err := checkSigV4(docCreds, r, docTime.Add(25*time.Hour)); err == nil || err.Message != "Request has expired" {
		t.Fatalf("expired URL accepted: %+v", err)
	}
	r2 := httptest.NewRequest(http.MethodGet, strings.Replace(target, "test.txt", "other.txt", 1), nil)
	r2.Host = r.Host
	if err := checkSigV4(docCreds, r2, docTime); err == nil || err.Code != "SignatureDoesNotMatch" {
		t.Fatalf("URL for another key accepted: %+v", err)
	}
	if err := checkSigV4(Credentials{AccessKey: "x", SecretKey: "y"}, r, docTime); err == nil || err.Code != "InvalidAccessKeyId" {
		t.Fatalf("unknown access key accepted: %+v", err)
	}
}

func TestPresignedURLRefusesUnsignedAmzHeaders(t *testing.T) {
	target := docPresignedGet
	r := httptest.NewRequest(http.MethodGet, target, nil)
	r.Host = "examplebucket.s3.amazonaws.com"
	r.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
	if err := checkSigV4(docCreds, r, docTime.Add(time.Hour)); err != nil {
		t.Fatalf("a declared payload hash refused: %s %s", err.Code, err.Message)
	}
	r.Header.Set("X-Amz-Copy-Source", "/bucket/projects/other/secret")
	err := checkSigV4(docCreds, r, docTime.Add(time.Hour))
	if err == nil || err.Code != "AccessDenied" || !strings.Contains(err.Message, "x-amz-copy-source") {
		t.Fatalf("unsigned x-amz-copy-source accepted: %+v", err)
	}
}

func TestHeaderGetVector(t *testing.T) {
	r := httptest.NewRequest(http.MethodGet, "/test.txt", nil)
	r.Host = "examplebucket.s3.amazonaws.com"
	r.Header.Set("Range", "bytes=0-9")
	r.Header.Set("X-Amz-Content-Sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
	r.Header.Set("X-Amz-Date", "20130524T000000Z")
	r.Header.Set("Authorization", "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"+
		"SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"+
		"Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")
	if err := checkSigV4(docCreds, r, docTime); err != nil {
		t.Fatalf("valid request rejected: %s %s", err.Code, err.Message)
	}
	r.Header.Set("Range", "bytes=0-10")
	if err := checkSigV4(docCreds, r, docTime); err == nil || err.Code != "SignatureDoesNotMatch" {
		t.Fatalf("tampered header accepted: %+v", err)
	}
	if err := checkSigV4(docCreds, r, docTime.Add(time.Hour)); err == nil || err.Code != "RequestTimeTooSkewed" {
		t.Fatalf("stale request accepted: %+v", err)
	}
}

func TestAnonymousDenied(t *testing.T) {
	r := httptest.NewRequest(http.MethodGet, "/bucket/key", nil)
	if err := checkSigV4(docCreds, r, time.Now()); err == nil || err.Code != "AccessDenied" {
		t.Fatalf("anonymous request accepted: %+v", err)
	}
}

func TestChunkedBody(t *testing.T) {
	body := "5;chunk-signature=abc\r\nhello\r\n6;chunk-signature=def\r\n world\r\n" +
		"0;chunk-signature=fin\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"
	c := &chunkedBody{r: bufio.NewReader(strings.NewReader(body)), closer: io.NopCloser(nil)}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "hello world" {
		t.Fatalf("got %q, %v", got, err)
	}
	trunc := &chunkedBody{r: bufio.NewReader(strings.NewReader("5\r\nhel")), closer: io.NopCloser(nil)}
	if _, err := io.ReadAll(trunc); err == nil {
		t.Fatal("truncated body read without error")
	}
}
