// Command etcd is upstream etcd's server entry point, unchanged; it exists so
// that hack/k8s-bins.sh can build etcd with plain `go build` from the module
// proxy instead of downloading a release tarball.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
