"""A process-based node agent: a kubelet stand-in for the local development cluster.

`python -m dsjobs.devcluster.node --kubeconfig ... --name ... --state-dir ... --port ...`
registers a Node, heartbeats its Lease, watches the pods bound to it and runs each
container as a host process.

**The host filesystem is the image.** A container's `image` is recorded in its status but
never pulled; its `command` + `args` run on the host with the agent's Python environment
first on PATH (so `python` in a pod is the interpreter that has `dsjobs` installed). Each
container gets a private mount namespace where its volumes (emptyDir, hostPath,
configMap, secret, downwardAPI, projected incl. service account tokens, and PVCs bound to
local/hostPath PVs) are bind-mounted at their mountPaths; missing mount targets are
created on the host as empty directories. All pods share the host network (pod IP =
node IP = 127.0.0.1). See docs/local-cluster.md for what differs from a real kubelet.

Modules: `podspec` (pure: pod -> plan), `status` (pure: process states -> PodStatus),
`mounts` (launch script, volume files), `gpu` (fake device allocator), `logs` (CRI log
files), `runtime` (processes on the event loop), `worker` (one pod's lifecycle),
`nodeobj` (Node/Lease objects), `kubeapi` (async REST client), `logs_server`
(kubelet-style HTTPS endpoint), `agent` (the whole).
"""
