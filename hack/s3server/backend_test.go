package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3afero"
)

// testServerDirs is one server root: the backend of a "run" and the dirs a
// second run (after a restart) finds again.
type testServerDirs struct{ data, spool, multipart string }

func newTestDirs(t *testing.T) testServerDirs {
	root := t.TempDir()
	d := testServerDirs{filepath.Join(root, "data"), filepath.Join(root, "spool"), filepath.Join(root, "multipart")}
	for _, dir := range []string{d.spool, d.multipart} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	return d
}

func (d testServerDirs) start(t *testing.T) *backend {
	fs, err := s3afero.FsPath(d.data, s3afero.FsPathCreateAll)
	if err != nil {
		t.Fatal(err)
	}
	inner, err := s3afero.MultiBucket(fs)
	if err != nil {
		t.Fatal(err)
	}
	if err := inner.CreateBucket("b"); err != nil && !gofakes3.HasErrorCode(err, gofakes3.ErrBucketAlreadyExists) {
		t.Fatal(err)
	}
	b, err := newBackend(inner, d.spool, d.multipart)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestMultipartUploadSurvivesARestart(t *testing.T) {
	dirs := newTestDirs(t)
	first := dirs.start(t)
	id, err := first.CreateMultipartUpload("b", "k", map[string]string{"X-Amz-Meta-A": "1"})
	if err != nil {
		t.Fatal(err)
	}
	one := bytes.Repeat([]byte("1"), 5<<20)
	etag1, err := first.UploadPart("b", "k", id, 1, int64(len(one)), bytes.NewReader(one))
	if err != nil {
		t.Fatal(err)
	}
	// A part cut off by the restart leaves a temp file behind.
	if err := os.WriteFile(filepath.Join(dirs.multipart, "mpu-"+string(id), "part-1.tmp"), []byte("cut"), 0o600); err != nil {
		t.Fatal(err)
	}
	// An upload whose creation was cut off before upload.json: its id never left the server.
	if err := os.Mkdir(filepath.Join(dirs.multipart, "mpu-half"), 0o700); err != nil {
		t.Fatal(err)
	}

	second := dirs.start(t) // the server restarted
	if _, err := os.Stat(filepath.Join(dirs.multipart, "mpu-half")); !os.IsNotExist(err) {
		t.Fatalf("half-created upload kept: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dirs.multipart, "mpu-"+string(id), "part-1.tmp")); !os.IsNotExist(err) {
		t.Fatalf("cut part kept: %v", err)
	}
	two := []byte("the rest")
	etag2, err := second.UploadPart("b", "k", id, 2, int64(len(two)), bytes.NewReader(two))
	if err != nil {
		t.Fatalf("the upload was lost in the restart: %v", err)
	}
	parts, err := second.ListParts("b", "k", id, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(parts.Parts) != 2 || parts.Parts[0].ETag != etag1 || parts.Parts[0].Size != int64(len(one)) {
		t.Fatalf("parts after the restart: %+v", parts.Parts)
	}
	uploads, err := second.ListMultipartUploads("b", nil, gofakes3.Prefix{}, 1000)
	if err != nil || len(uploads.Uploads) != 1 || uploads.Uploads[0].UploadID != id {
		t.Fatalf("uploads after the restart: %+v, %v", uploads, err)
	}
	req := &gofakes3.CompleteMultipartUploadRequest{Parts: []gofakes3.CompletedPart{
		{PartNumber: 1, ETag: etag1}, {PartNumber: 2, ETag: etag2},
	}}
	if _, _, err := second.CompleteMultipartUpload("b", "k", id, req); err != nil {
		t.Fatal(err)
	}
	obj, err := second.GetObject("b", "k", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Contents.Close()
	got, err := io.ReadAll(obj.Contents)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, append(one, two...)) {
		t.Fatalf("object: %d bytes, want %d", len(got), len(one)+len(two))
	}
	if obj.Metadata["X-Amz-Meta-A"] != "1" {
		t.Fatalf("metadata lost: %v", obj.Metadata)
	}
	if entries, _ := os.ReadDir(dirs.multipart); len(entries) != 0 {
		t.Fatalf("completed upload left files: %v", entries)
	}
	third := dirs.start(t)
	if _, err := third.UploadPart("b", "k", id, 3, 1, bytes.NewReader([]byte("x"))); !gofakes3.HasErrorCode(err, gofakes3.ErrNoSuchUpload) {
		t.Fatalf("a completed upload came back: %v", err)
	}
}

func TestAbortedUploadStaysAborted(t *testing.T) {
	dirs := newTestDirs(t)
	first := dirs.start(t)
	id, err := first.CreateMultipartUpload("b", "k", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.AbortMultipartUpload("b", "k", id); err != nil {
		t.Fatal(err)
	}
	second := dirs.start(t)
	if _, err := second.UploadPart("b", "k", id, 1, 1, bytes.NewReader([]byte("x"))); !gofakes3.HasErrorCode(err, gofakes3.ErrNoSuchUpload) {
		t.Fatalf("an aborted upload came back: %v", err)
	}
}
