package main

import (
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/johannesboyne/gofakes3"
)

// backend wraps the s3afero filesystem backend:
//
//   - PutObject first spools the request body to a local file and only then
//     hands it to s3afero. s3afero holds one lock over all buckets for the
//     whole write, so without spooling one slow client uploading a checkpoint
//     would stall every other request of the cluster.
//   - It implements gofakes3.MultipartBackend with parts on disk; gofakes3's
//     built-in uploader keeps every part in memory and then concatenates them
//     into one more in-memory copy (2x the object size in RAM).
//   - Multipart uploads survive a restart of the server, as they do on S3: each
//     lives in <multipart>/mpu-<id>/ with its upload.json and one file per
//     part, and newBackend reads them back (a restart mid-upload must not turn
//     the next UploadPart into NoSuchUpload).
type backend struct {
	gofakes3.Backend
	spool     string
	multipart string

	mu      sync.Mutex
	uploads map[gofakes3.UploadID]*upload
}

var (
	_ gofakes3.Backend          = (*backend)(nil)
	_ gofakes3.MultipartBackend = (*backend)(nil)
)

type upload struct {
	Bucket    string            `json:"bucket"`
	Object    string            `json:"object"`
	Meta      map[string]string `json:"meta"`
	Initiated time.Time         `json:"initiated"`
	dir       string
	mu        sync.Mutex
	parts     map[int]partInfo
}

type partInfo struct {
	etag     string // quoted hex md5
	size     int64
	modified time.Time
}

const uploadFile = "upload.json"

// newBackend serves inner, spooling to spool and keeping multipart uploads
// under multipart, where it finds the uploads a previous run left unfinished.
func newBackend(inner gofakes3.Backend, spool, multipart string) (*backend, error) {
	b := &backend{Backend: inner, spool: spool, multipart: multipart, uploads: map[gofakes3.UploadID]*upload{}}
	entries, err := os.ReadDir(multipart)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		id, ok := strings.CutPrefix(e.Name(), "mpu-")
		dir := filepath.Join(multipart, e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		u, err := loadUpload(dir)
		if err != nil {
			// Killed while creating it: its id never reached the client.
			log.Printf("dsjobs-s3server: dropping multipart upload %s: %v", id, err)
			_ = os.RemoveAll(dir)
			continue
		}
		b.uploads[gofakes3.UploadID(id)] = u
	}
	return b, nil
}

func loadUpload(dir string) (*upload, error) {
	raw, err := os.ReadFile(filepath.Join(dir, uploadFile))
	if err != nil {
		return nil, err
	}
	u := &upload{dir: dir, parts: map[int]partInfo{}}
	if err := json.Unmarshal(raw, u); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		if strings.HasSuffix(e.Name(), ".tmp") {
			_ = os.Remove(path) // a part whose upload was cut: S3 never saw it either
			continue
		}
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		info, err := partOf(path)
		if err != nil {
			return nil, err
		}
		u.parts[n] = info
	}
	return u, nil
}

// partOf reads a stored part back: its ETag is the MD5 of its bytes.
func partOf(path string) (partInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return partInfo{}, err
	}
	defer f.Close()
	h := md5.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return partInfo{}, err
	}
	st, err := f.Stat()
	if err != nil {
		return partInfo{}, err
	}
	return partInfo{etag: `"` + hex.EncodeToString(h.Sum(nil)) + `"`, size: n, modified: st.ModTime().UTC()}, nil
}

func randomID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b[:])
}

// PutObject spools input to disk, then writes it through s3afero from there.
func (b *backend) PutObject(bucket, object string, meta map[string]string, input io.Reader,
	size int64, conditions *gofakes3.PutConditions,
) (gofakes3.PutObjectResult, error) {
	if ok, err := b.BucketExists(bucket); err != nil {
		return gofakes3.PutObjectResult{}, err
	} else if !ok {
		return gofakes3.PutObjectResult{}, gofakes3.BucketNotFound(bucket)
	}
	f, err := os.CreateTemp(b.spool, "put-*")
	if err != nil {
		return gofakes3.PutObjectResult{}, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	n, err := io.Copy(f, input)
	if err != nil {
		log.Printf("dsjobs-s3server: PUT %s/%s: spooling the body failed after %d bytes: %v", bucket, object, n, err)
		return gofakes3.PutObjectResult{}, err
	}
	if size >= 0 && n != size {
		return gofakes3.PutObjectResult{}, gofakes3.ErrIncompleteBody
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return gofakes3.PutObjectResult{}, err
	}
	res, err := b.Backend.PutObject(bucket, object, meta, f, n, conditions)
	if err != nil {
		// The client gets a bare 500; the cause (a full disk, say) is for whoever runs the server.
		// s3afero writes in place: the object may now be cut short (a known limit of the stand-in).
		log.Printf("dsjobs-s3server: PUT %s/%s (%d bytes) failed: %v", bucket, object, n, err)
	}
	return res, err
}

func (b *backend) CreateMultipartUpload(bucket, object string, meta map[string]string) (gofakes3.UploadID, error) {
	id := gofakes3.UploadID(randomID())
	dir := filepath.Join(b.multipart, "mpu-"+string(id))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	u := &upload{
		Bucket: bucket, Object: object, Meta: meta, Initiated: time.Now().UTC(),
		dir: dir, parts: map[int]partInfo{},
	}
	if err := writeFileAtomic(filepath.Join(dir, uploadFile), u); err != nil {
		_ = os.RemoveAll(dir)
		return "", err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.uploads[id] = u
	return id, nil
}

func writeFileAtomic(path string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func (b *backend) get(bucket, object string, id gofakes3.UploadID) (*upload, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	u, ok := b.uploads[id]
	if !ok || u.Bucket != bucket || u.Object != object {
		return nil, gofakes3.ErrNoSuchUpload
	}
	return u, nil
}

func (b *backend) UploadPart(bucket, object string, id gofakes3.UploadID, partNumber int,
	contentLength int64, input io.Reader,
) (string, error) {
	if partNumber < 1 || partNumber > gofakes3.MaxUploadPartNumber {
		return "", gofakes3.ErrInvalidPart
	}
	u, err := b.get(bucket, object, id)
	if err != nil {
		return "", err
	}
	// Write to a unique temp name and rename: a retried part replaces the
	// previous one atomically, as on S3.
	f, err := os.CreateTemp(u.dir, "part-*.tmp")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name()) // no-op after the rename
	h := md5.New()
	n, err := io.Copy(io.MultiWriter(f, h), input)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", err
	}
	if contentLength >= 0 && n != contentLength {
		return "", gofakes3.ErrIncompleteBody
	}
	etag := `"` + hex.EncodeToString(h.Sum(nil)) + `"`
	u.mu.Lock()
	defer u.mu.Unlock()
	if err := os.Rename(f.Name(), filepath.Join(u.dir, strconv.Itoa(partNumber))); err != nil {
		return "", err
	}
	u.parts[partNumber] = partInfo{etag: etag, size: n, modified: time.Now().UTC()}
	return etag, nil
}

func (b *backend) ListParts(bucket, object string, id gofakes3.UploadID, marker int, limit int64,
) (*gofakes3.ListMultipartUploadPartsResult, error) {
	u, err := b.get(bucket, object, id)
	if err != nil {
		return nil, err
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	nums := make([]int, 0, len(u.parts))
	for n := range u.parts {
		if n > marker {
			nums = append(nums, n)
		}
	}
	sort.Ints(nums)
	res := &gofakes3.ListMultipartUploadPartsResult{
		Bucket: bucket, Key: object, UploadID: id, MaxParts: limit,
		PartNumberMarker: marker, StorageClass: "STANDARD",
	}
	for i, n := range nums {
		if int64(i) >= limit {
			res.IsTruncated = true
			break
		}
		p := u.parts[n]
		res.Parts = append(res.Parts, gofakes3.ListMultipartUploadPartItem{
			PartNumber: n, ETag: p.etag, Size: p.size, LastModified: gofakes3.NewContentTime(p.modified),
		})
		res.NextPartNumberMarker = n
	}
	return res, nil
}

func (b *backend) ListMultipartUploads(bucket string, marker *gofakes3.UploadListMarker,
	prefix gofakes3.Prefix, limit int64,
) (*gofakes3.ListMultipartUploadsResult, error) {
	b.mu.Lock()
	type item struct {
		id gofakes3.UploadID
		u  *upload
	}
	var items []item
	for id, u := range b.uploads {
		if u.Bucket == bucket && strings.HasPrefix(u.Object, prefix.Prefix) {
			items = append(items, item{id, u})
		}
	}
	b.mu.Unlock()
	sort.Slice(items, func(i, j int) bool {
		if items[i].u.Object != items[j].u.Object {
			return items[i].u.Object < items[j].u.Object
		}
		return items[i].id < items[j].id
	})
	res := &gofakes3.ListMultipartUploadsResult{
		Bucket: bucket, Prefix: prefix.Prefix, Delimiter: prefix.Delimiter, MaxUploads: limit,
	}
	if marker != nil {
		res.KeyMarker, res.UploadIDMarker = marker.Object, marker.UploadID
	}
	var count int64
	for _, it := range items {
		if marker != nil && (it.u.Object < marker.Object ||
			(it.u.Object == marker.Object && (marker.UploadID == "" || it.id <= marker.UploadID))) {
			continue
		}
		if count >= limit {
			res.IsTruncated = true
			break
		}
		res.Uploads = append(res.Uploads, gofakes3.ListMultipartUploadItem{
			Key: it.u.Object, UploadID: it.id, StorageClass: "STANDARD",
			Initiated: gofakes3.NewContentTime(it.u.Initiated),
		})
		res.NextKeyMarker, res.NextUploadIDMarker = it.u.Object, it.id
		count++
	}
	return res, nil
}

func (b *backend) AbortMultipartUpload(bucket, object string, id gofakes3.UploadID) error {
	u, err := b.get(bucket, object, id)
	if err != nil {
		return err
	}
	b.mu.Lock()
	delete(b.uploads, id)
	b.mu.Unlock()
	return os.RemoveAll(u.dir)
}

// CompleteMultipartUpload streams the listed parts, in order, into the
// object; memory use is independent of the object size.
func (b *backend) CompleteMultipartUpload(bucket, object string, id gofakes3.UploadID,
	input *gofakes3.CompleteMultipartUploadRequest,
) (gofakes3.VersionID, string, error) {
	u, err := b.get(bucket, object, id)
	if err != nil {
		return "", "", err
	}
	u.mu.Lock()
	defer u.mu.Unlock()

	if len(input.Parts) == 0 {
		return "", "", gofakes3.ErrorMessage(gofakes3.ErrMalformedXML, "no parts")
	}
	var (
		readers []io.Reader
		files   []*os.File
		size    int64
		etagSum = md5.New()
		prev    = 0
	)
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, in := range input.Parts {
		if in.PartNumber <= prev {
			return "", "", gofakes3.ErrInvalidPartOrder
		}
		prev = in.PartNumber
		p, ok := u.parts[in.PartNumber]
		if !ok || strings.Trim(in.ETag, `"`) != strings.Trim(p.etag, `"`) {
			return "", "", gofakes3.ErrorMessagef(gofakes3.ErrInvalidPart, "part %d is missing or its ETag differs", in.PartNumber)
		}
		raw, _ := hex.DecodeString(strings.Trim(p.etag, `"`))
		etagSum.Write(raw)
		f, err := os.Open(filepath.Join(u.dir, strconv.Itoa(in.PartNumber)))
		if err != nil {
			return "", "", err
		}
		files = append(files, f)
		readers = append(readers, f)
		size += p.size
	}
	res, err := b.Backend.PutObject(bucket, object, u.Meta, io.MultiReader(readers...), size, nil)
	if err != nil {
		return "", "", err
	}
	b.mu.Lock()
	delete(b.uploads, id)
	b.mu.Unlock()
	_ = os.RemoveAll(u.dir)
	etag := fmt.Sprintf(`"%s-%d"`, hex.EncodeToString(etagSum.Sum(nil)), len(input.Parts))
	return res.VersionID, etag, nil
}
