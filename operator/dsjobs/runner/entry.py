"""Render the job container's entry script: POSIX ``sh`` (dash, busybox ash, bash), no Python needed.

The script (written by stage-in to ``<shared>/entry.sh``, run as ``/bin/sh <shared>/entry.sh``):

1. records that it started and keeps a heartbeat file ticking (so the ship sidecar can tell a
   running program from a container that was killed outright, e.g. by the OOM killer);
2. enters the working directory; the job's environment (its variables, JOB_PROGRESS_FILENAME,
   DS_PROJECT_HOME) is exported only in the subshells that become the program, its Python lookup
   and pip, so a job's own PATH or IFS cannot take the script's tools away (the launcher, tee,
   the graceful-shutdown timer are found on the image's PATH);
3. only when the job has a Python environment: checks the image interpreter's version, pip-installs
   the requirements into a job-local virtual environment over the image's packages (pip installs
   only what the image lacks), and puts local modules + its site dir on PYTHONPATH, its bin last on
   PATH (the program runs the image's interpreter);
4. runs ``cmd`` under ``bash -c`` (``sh -c`` when the image has no bash) in its own session
   (``setsid``) with SIGINT/SIGQUIT reset to default, stdout and stderr each through a FIFO into
   a ``tee`` that appends to a file in the shared volume and copies to the container log - two
   separate streams, and the program's own exit status (no pipeline, so nothing is lost to it);
5. on SIGTERM/SIGINT/SIGHUP (pod deletion = cancel): sends the configured graceful-shutdown signal
   to the program's process group and SIGKILL after the timeout; without graceful-shutdown
   parameters, SIGKILL at once (DataSphere semantics);
6. after the program exits: kills what is left of its process group, waits for the tees to drain,
   then writes the status file (``rc``, ``phase``, ``cancelled``, ``reason``, ``end=1``) - only
   then, so a reader that sees the status knows the log files are complete - and exits with the
   program's code (``SETUP_FAILED_EXIT`` when setup failed, 143 when cancelled before start).

A system log this uid cannot append to (made by another uid without write permission) costs its
lines, not the job: they go to /dev/null.

Missing tools degrade, never fail: no ``tee``/``mkfifo`` -> output goes to the files only; no
``setsid`` -> signals go to the program's process only; no ``env --default-signal`` -> the
program inherits an ignored SIGINT (non-interactive shells ignore it in background jobs), which
matters only for a graceful signal of SIGINT, handled then through the image's python3 if any.
"""

from __future__ import annotations

import math
import re
import shlex

from dsjobs.runner.cmd import render_config_cmd
from dsjobs.runner.config import ENV_PROGRESS_FILE, ENV_PROJECT_HOME, RunnerConfig

#: Exit code of the job container when the job's setup (python check, pip) failed: the operator
#: says so while the ship still uploads, instead of "the program exited with code 120".
SETUP_FAILED_EXIT = 120
#: Exit code when cancelled before the program started.
CANCELLED_EXIT = 143
#: Seconds between heartbeats.
HEARTBEAT_SECONDS = 2
#: After the program exits, how long leftovers holding its output pipes may delay the end.
TEE_DRAIN_SECONDS = 10
#: Seconds between two samples of the container's resource usage (docker_stats.tsv, gpu_stats.tsv).
STATS_SECONDS = 10
#: The header line of docker_stats.tsv (docs/runner.md#resource-usage).
DOCKER_STATS_HEADER = (
    "time",
    "cpu_percent",
    "cpu_seconds",
    "memory_bytes",
    "memory_limit_bytes",
    "memory_percent",
    "memory_peak_bytes",
    "pids",
)
#: What `nvidia-smi --query-gpu` is asked for, in gpu_stats.tsv's columns after `time`.
GPU_STATS_QUERY = (
    "index",
    "name",
    "utilization.gpu",
    "utilization.memory",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
)

_PIP_BASE = "-m pip install --no-input --disable-pip-version-check --no-cache-dir --no-warn-script-location"

# Resets SIGINT/SIGQUIT, then execs the rest of argv: the fallback when `env --default-signal`
# is unavailable and the graceful signal is SIGINT.
_PY_TRAMPOLINE = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.signal(signal.SIGQUIT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"
)

# How the script signals the program (a constant of its own so that tests can run it alone).
# Which form of `kill` takes a process group is found once: dash needs `--` before `-PGID`;
# busybox's kill does not know `--` and, given it, signals the group *and* fails, so trying
# one form after the other would send the signal twice (a second SIGINT interrupts a Python
# program's KeyboardInterrupt handling).
KILL_HELPERS = r"""
if kill -s 0 -- "$$" 2>/dev/null; then DSJOBS_KILL_END=--; else DSJOBS_KILL_END=''; fi

# dsjobs_other_groups SID: the process groups of session SID besides its leader's, each once per
# live (not zombie) member: what the program put in groups of their own (GNU timeout, a shell's
# job control, setpgid), which a signal to its group misses. From /proc: fields
# after the command's closing parenthesis are state, ppid, pgrp, session.
dsjobs_other_groups() {
  for dsjobs_f in "${DSJOBS_PROC:-/proc}"/[0-9]*/stat; do
    dsjobs_l=''
    { read -r dsjobs_l <"$dsjobs_f"; } 2>/dev/null || continue
    dsjobs_l=${dsjobs_l##*) }
    dsjobs_st=${dsjobs_l%% *}
    dsjobs_l=${dsjobs_l#* }
    dsjobs_l=${dsjobs_l#* }
    dsjobs_pg=${dsjobs_l%% *}
    dsjobs_l=${dsjobs_l#* }
    [ "${dsjobs_l%% *}" = "$dsjobs_sid" ] && [ "$dsjobs_pg" != "$dsjobs_sid" ] && [ "$dsjobs_st" != Z ] && echo "$dsjobs_pg"
  done
}

# dsjobs_kill SIGNAL PID: the program's process group when it has its own session (setsid), and
# after a cancel each other group of the session too (a walk of /proc: not at every job's end);
# else the process itself. Signal 0: whether any of them is alive.
dsjobs_kill() {
  [ -n "$2" ] || return 0
  if [ "$DSJOBS_SETSID" = 1 ]; then
    dsjobs_k=1
    # shellcheck disable=SC2086 # DSJOBS_KILL_END is `--` or nothing
    kill -s "$1" $DSJOBS_KILL_END "-$2" 2>/dev/null && dsjobs_k=0
    if [ "${DSJOBS_CANCEL:-0}" = 1 ]; then
      dsjobs_sid=$2
      dsjobs_seen=' '
      for dsjobs_g in $(dsjobs_other_groups); do
        case $dsjobs_seen in *" $dsjobs_g "*) continue ;; esac
        dsjobs_seen="$dsjobs_seen$dsjobs_g "
        # shellcheck disable=SC2086
        kill -s "$1" $DSJOBS_KILL_END "-$dsjobs_g" 2>/dev/null && dsjobs_k=0
      done
    fi
    [ "$dsjobs_k" = 1 ] || return 0
  fi
  kill -s "$1" "$2" 2>/dev/null
}
"""

# The resource-usage sampler (docs/runner.md#resource-usage). Its comments stay here, not in
# every job's runner Secret: the rendered script drops its comment lines (`_without_comments`).
_SAMPLER_SOURCE = r"""
# Resource usage (docs/runner.md#resource-usage): this container's cgroup, read with the shell's
# own `read` (no process per file), a TSV line every DSJOBS_STATS_SECONDS to docker_stats.tsv, and
# the image's nvidia-smi to gpu_stats.tsv. A subshell of its own, so that a hanging nvidia-smi never
# stops the heartbeat. Where this container has no cgroup of its own to read (a hierarchy's root
# would be the whole machine's usage), its columns stay empty, or no file at all.
dsjobs_isnum() { case $1 in '' | *[!0-9]*) return 1 ;; esac; }

# dsjobs_read FILE: its first line in dsjobs_v ('' when unreadable).
dsjobs_read() { dsjobs_v=''; { read -r dsjobs_v <"$1"; } 2>/dev/null || :; }

# dsjobs_key FILE KEY: the value of KEY in a "key value" file (cpu.stat, memory.stat).
dsjobs_key() {
  dsjobs_v=''
  { while read -r dsjobs_k dsjobs_x; do
      if [ "$dsjobs_k" = "$2" ]; then dsjobs_v=$dsjobs_x; break; fi
    done <"$1"; } 2>/dev/null || :
}

# dsjobs_cgdir HIERARCHY PATH FILE: the directory holding FILE in dsjobs_v: the cgroup at its path
# (the host's cgroup namespace), else the mount itself (a private namespace, or docker's v1 view).
dsjobs_cgdir() {
  for dsjobs_v in "$DSJOBS_CGROUP_FS$1${2%/}" "$DSJOBS_CGROUP_FS$1"; do
    [ -f "$dsjobs_v/$3" ] && return 0
  done
  dsjobs_v=''
  return 1
}

dsjobs_cgroups() {
  DSJOBS_CG_V=''; DSJOBS_CG_MEM=''; DSJOBS_CG_CPU=''; DSJOBS_CG_PIDS=''
  [ -r "$DSJOBS_PROC/self/cgroup" ] || return 0
  if [ -f "$DSJOBS_CGROUP_FS/cgroup.controllers" ]; then
    DSJOBS_CG_V=2
    while IFS=: read -r dsjobs_h dsjobs_c dsjobs_p; do
      # The host's root cgroup has no memory.current: only a container's own is found.
      if [ "$dsjobs_h" = 0 ] && dsjobs_cgdir '' "$dsjobs_p" memory.current; then
        DSJOBS_CG_MEM=$dsjobs_v; DSJOBS_CG_CPU=$dsjobs_v; DSJOBS_CG_PIDS=$dsjobs_v
      fi
    done <"$DSJOBS_PROC/self/cgroup"
  else
    DSJOBS_CG_V=1
    while IFS=: read -r dsjobs_h dsjobs_c dsjobs_p; do
      # At a hierarchy's root (no cgroup of the container's own): the whole machine; not read.
      [ "$dsjobs_p" != / ] || continue
      case ",$dsjobs_c," in
        *,memory,*) dsjobs_cgdir "/$dsjobs_c" "$dsjobs_p" memory.usage_in_bytes && DSJOBS_CG_MEM=$dsjobs_v ;;
      esac
      case ",$dsjobs_c," in
        *,cpuacct,*) dsjobs_cgdir "/$dsjobs_c" "$dsjobs_p" cpuacct.usage && DSJOBS_CG_CPU=$dsjobs_v ;;
      esac
      case ",$dsjobs_c," in
        *,pids,*) dsjobs_cgdir "/$dsjobs_c" "$dsjobs_p" pids.current && DSJOBS_CG_PIDS=$dsjobs_v ;;
      esac
    done <"$DSJOBS_PROC/self/cgroup"
  fi
}

# Centiseconds since boot in dsjobs_cs, from /proc/uptime ("12345.67 ..."); '' when unreadable.
dsjobs_uptime() {
  dsjobs_read "$DSJOBS_PROC/uptime"
  dsjobs_u=${dsjobs_v%% *}
  dsjobs_i=${dsjobs_u%.*}
  dsjobs_f=${dsjobs_u#"$dsjobs_i"}
  dsjobs_f=${dsjobs_f#.}00
  dsjobs_f=${dsjobs_f%"${dsjobs_f#??}"}
  dsjobs_f=${dsjobs_f#0}
  dsjobs_cs=''
  if dsjobs_isnum "$dsjobs_i" && dsjobs_isnum "$dsjobs_f"; then dsjobs_cs=$((dsjobs_i * 100 + dsjobs_f)); fi
}

# dsjobs_tenths N: N tenths as "I.F" in dsjobs_v.
dsjobs_tenths() { dsjobs_v="$(($1 / 10)).$(($1 % 10))"; }

# dsjobs_now: the sample's time in dsjobs_t (one `date` per sample, shared by both files).
dsjobs_now() { dsjobs_t=$(date -u '+%Y-%m-%dT%H:%M:%SZ' 2>/dev/null) || dsjobs_t=''; }

dsjobs_docker_stats() {
  dsjobs_uptime
  dsjobs_cpu_pct=''; dsjobs_cpu_s=''; dsjobs_us=''
  if [ -n "$DSJOBS_CG_CPU" ]; then
    if [ "$DSJOBS_CG_V" = 2 ]; then
      dsjobs_key "$DSJOBS_CG_CPU/cpu.stat" usage_usec
      dsjobs_us=$dsjobs_v
    else
      dsjobs_read "$DSJOBS_CG_CPU/cpuacct.usage"
      if dsjobs_isnum "$dsjobs_v"; then dsjobs_us=$((dsjobs_v / 1000)); fi
    fi
  fi
  if dsjobs_isnum "$dsjobs_us"; then
    dsjobs_ms=$((dsjobs_us / 1000 % 1000))
    case $dsjobs_ms in ?) dsjobs_ms=00$dsjobs_ms ;; ??) dsjobs_ms=0$dsjobs_ms ;; esac
    dsjobs_cpu_s="$((dsjobs_us / 1000000)).$dsjobs_ms"
    # The previous sample's usage and time, kept in a file: the last sample is taken by the
    # script itself, after the sampler is gone. A regular file only: the job can put a FIFO
    # there, whose open would wait for a writer for good.
    dsjobs_v=''
    if [ -f "$DSJOBS_STATS_PREV" ]; then dsjobs_read "$DSJOBS_STATS_PREV"; fi
    dsjobs_pu=${dsjobs_v% *}
    dsjobs_pc=${dsjobs_v#* }
    if dsjobs_isnum "$dsjobs_pu" && dsjobs_isnum "$dsjobs_pc" && dsjobs_isnum "$dsjobs_cs" \
      && [ "$dsjobs_cs" -gt "$dsjobs_pc" ] && [ "$dsjobs_us" -ge "$dsjobs_pu" ]; then
      dsjobs_tenths $(((dsjobs_us - dsjobs_pu) / ((dsjobs_cs - dsjobs_pc) * 10)))
      dsjobs_cpu_pct=$dsjobs_v
    fi
    if dsjobs_isnum "$dsjobs_cs"; then
      [ -f "$DSJOBS_STATS_PREV" ] || rm -f "$DSJOBS_STATS_PREV" 2>/dev/null
      { printf '%s %s\n' "$dsjobs_us" "$dsjobs_cs" >"$DSJOBS_STATS_PREV"; } 2>/dev/null || :
    fi
  fi
  dsjobs_mem=''; dsjobs_cache=''; dsjobs_lim=''; dsjobs_mem_pct=''; dsjobs_peak=''; dsjobs_pids=''
  if [ -n "$DSJOBS_CG_MEM" ]; then
    if [ "$DSJOBS_CG_V" = 2 ]; then
      dsjobs_read "$DSJOBS_CG_MEM/memory.current"; dsjobs_mem=$dsjobs_v
      dsjobs_key "$DSJOBS_CG_MEM/memory.stat" inactive_file; dsjobs_cache=$dsjobs_v
      dsjobs_read "$DSJOBS_CG_MEM/memory.max"; dsjobs_lim=$dsjobs_v
      dsjobs_read "$DSJOBS_CG_MEM/memory.peak"; dsjobs_peak=$dsjobs_v
    else
      dsjobs_read "$DSJOBS_CG_MEM/memory.usage_in_bytes"; dsjobs_mem=$dsjobs_v
      dsjobs_key "$DSJOBS_CG_MEM/memory.stat" total_inactive_file; dsjobs_cache=$dsjobs_v
      dsjobs_read "$DSJOBS_CG_MEM/memory.limit_in_bytes"; dsjobs_lim=$dsjobs_v
      dsjobs_read "$DSJOBS_CG_MEM/memory.max_usage_in_bytes"; dsjobs_peak=$dsjobs_v
    fi
    dsjobs_isnum "$dsjobs_mem" || dsjobs_mem=''
    dsjobs_isnum "$dsjobs_peak" || dsjobs_peak=''
    # As `docker stats`: without the page cache the kernel reclaims first (inactive files).
    if [ -n "$dsjobs_mem" ] && dsjobs_isnum "$dsjobs_cache" && [ "$dsjobs_cache" -le "$dsjobs_mem" ]; then
      dsjobs_mem=$((dsjobs_mem - dsjobs_cache))
    fi
    # No limit: "max" (v2), or about 2^63 (v1).
    if ! dsjobs_isnum "$dsjobs_lim" || [ "${#dsjobs_lim}" -gt 18 ] || [ "$dsjobs_lim" = 0 ]; then dsjobs_lim=''; fi
    if [ -n "$dsjobs_mem" ] && [ -n "$dsjobs_lim" ]; then
      dsjobs_tenths $((dsjobs_mem * 1000 / dsjobs_lim))
      dsjobs_mem_pct=$dsjobs_v
    fi
  fi
  if [ -n "$DSJOBS_CG_PIDS" ]; then
    dsjobs_read "$DSJOBS_CG_PIDS/pids.current"
    if dsjobs_isnum "$dsjobs_v"; then dsjobs_pids=$dsjobs_v; fi
  fi
  # One printf, one write: a sampler killed meanwhile leaves no half line.
  { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$dsjobs_t" "$dsjobs_cpu_pct" "$dsjobs_cpu_s" \
    "$dsjobs_mem" "$dsjobs_lim" "$dsjobs_mem_pct" "$dsjobs_peak" "$dsjobs_pids" >>"$DSJOBS_DOCKER_STATS"; } 2>/dev/null || :
}

# nvidia-smi's CSV ("0, NVIDIA A100, 97, ...") as TSV lines after the time.
dsjobs_gpu_stats() {
  { "$DSJOBS_NVSMI" --query-gpu="$DSJOBS_GPU_QUERY" --format=csv,noheader,nounits </dev/null 2>/dev/null \
    | while IFS= read -r dsjobs_l; do
        dsjobs_o=$dsjobs_t
        while :; do
          case $dsjobs_l in
            *', '*) dsjobs_o="$dsjobs_o$DSJOBS_TAB${dsjobs_l%%, *}"; dsjobs_l=${dsjobs_l#*, } ;;
            *) dsjobs_o="$dsjobs_o$DSJOBS_TAB$dsjobs_l"; break ;;
          esac
        done
        printf '%s\n' "$dsjobs_o"
      done >>"$DSJOBS_GPU_STATS"; } 2>/dev/null || :
}

dsjobs_sampler() {
  trap '' TERM INT HUP
  dsjobs_cgroups
  DSJOBS_NVSMI=$(command -v nvidia-smi) 2>/dev/null || DSJOBS_NVSMI=''
  if [ -n "$DSJOBS_CG_MEM$DSJOBS_CG_CPU" ]; then
    dsjobs_log "resource usage every ${DSJOBS_STATS_SECONDS}s to docker_stats.tsv (cgroup v$DSJOBS_CG_V: memory ${DSJOBS_CG_MEM:-unknown}, cpu ${DSJOBS_CG_CPU:-unknown})"
    { printf '%s\n' "$DSJOBS_DOCKER_STATS_HEADER" >>"$DSJOBS_DOCKER_STATS"; } 2>/dev/null || :
  else
    dsjobs_log "resource usage: this container has no cgroup of its own to read: no docker_stats.tsv"
  fi
  DSJOBS_TAB=$(printf '\t')
  if [ -n "$DSJOBS_NVSMI" ]; then
    dsjobs_log "GPU usage every ${DSJOBS_STATS_SECONDS}s to gpu_stats.tsv ($DSJOBS_NVSMI)"
    { printf '%s\n' "$DSJOBS_GPU_STATS_HEADER" >>"$DSJOBS_GPU_STATS"; } 2>/dev/null || :
  fi
  [ -n "$DSJOBS_CG_MEM$DSJOBS_CG_CPU$DSJOBS_NVSMI" ] || return 0
  while kill -0 "$1" 2>/dev/null; do
    dsjobs_now
    if [ -n "$DSJOBS_CG_MEM$DSJOBS_CG_CPU" ]; then dsjobs_docker_stats; fi
    if [ -n "$DSJOBS_NVSMI" ]; then dsjobs_gpu_stats; fi
    sleep "$DSJOBS_STATS_SECONDS"
  done
}

# The sampler's last line is the script's own, once the program is over (the totals and the peak).
dsjobs_stop_sampler() {
  [ -n "$DSJOBS_STATS_PID" ] || return 0
  kill -s KILL "$DSJOBS_STATS_PID" 2>/dev/null
  wait "$DSJOBS_STATS_PID" 2>/dev/null
  DSJOBS_STATS_PID=''
  if [ -s "$DSJOBS_DOCKER_STATS" ]; then
    ( exec </dev/null >/dev/null 2>&1 9>&-; dsjobs_cgroups; dsjobs_now; dsjobs_docker_stats )
  fi
}

"""


def _without_comments(script: str) -> str:
    """Shell source without its comment-only lines (none of them is inside a quoted string)."""
    return "".join(line for line in script.splitlines(keepends=True) if not line.lstrip().startswith("#"))


_SAMPLER = _without_comments(_SAMPLER_SOURCE)

_PROLOGUE = (
    r"""#!/bin/sh
# dsjobs job entry script, generated by dsjobs.runner.entry - do not edit.
# POSIX sh only: it must run under dash, busybox ash and bash, in images without Python.
set -u

DSJOBS_PID=''
DSJOBS_RC=0
DSJOBS_PHASE=setup
DSJOBS_CANCEL=0
DSJOBS_SIGNALLED=0
DSJOBS_FORKED=''
DSJOBS_KILLER=''
DSJOBS_HB_PID=''
DSJOBS_STATS_PID=''
DSJOBS_TEES=''
# The log files a tee could not write all of (`out`, `err`): the job's disk full, say.
DSJOBS_LOGS_CUT=''
DSJOBS_PY=''
DSJOBS_SETSID=0
DSJOBS_SYSLOG_TO=$DSJOBS_SYSLOG
DSJOBS_SYSLOG_FD=''

dsjobs_log() {
  # Once the program runs, through the log as it was when it started (fd 8): the program may
  # replace it by a FIFO between a check of the path and its open, which would wait for good.
  if [ "$DSJOBS_SYSLOG_FD" = 8 ]; then
    { printf '%s entry: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ' 2>/dev/null)" "$*" >&8; } 2>/dev/null
    return 0
  fi
  # The group's 2>/dev/null applies first: a log that cannot be opened costs the line, silently.
  # Only a regular file (or /dev/null): the job can replace the log by a FIFO, whose open would
  # wait for a reader for good.
  [ -f "$DSJOBS_SYSLOG_TO" ] || [ "$DSJOBS_SYSLOG_TO" = /dev/null ] || return 0
  { printf '%s entry: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ' 2>/dev/null)" "$*" >>"$DSJOBS_SYSLOG_TO"; } 2>/dev/null
}

"""
    + KILL_HELPERS
    + r"""
dsjobs_status_text() {
  printf 'rc=%s\nphase=%s\ncancelled=%s\nreason=%s\ncut=%s\nend=1\n' "$1" "$2" "$DSJOBS_CANCEL" "$3" "$DSJOBS_LOGS_CUT"
}

dsjobs_status() {
  # Written only when all output is in the log files; `end=1` marks a complete file. First over
  # the room taken at the start (1<> neither truncates nor needs new blocks: a program that filled
  # the disk does not cost the job its exit status), else afresh.
  # Anything but a regular file there (a FIFO the job made: its open would wait for good) goes.
  # The run dir again, should the job have deleted it (ship waits for this file).
  [ -d "$DSJOBS_RUN" ] || mkdir -p "$DSJOBS_RUN" 2>/dev/null
  { [ -f "$DSJOBS_STATUS.tmp" ] || rm -f "$DSJOBS_STATUS.tmp"; } 2>/dev/null
  { [ -s "$DSJOBS_STATUS.tmp" ] && dsjobs_status_text "$@" 1<>"$DSJOBS_STATUS.tmp" \
    && mv -f "$DSJOBS_STATUS.tmp" "$DSJOBS_STATUS"; } 2>/dev/null \
    || { dsjobs_status_text "$@" >"$DSJOBS_STATUS.tmp" && mv -f "$DSJOBS_STATUS.tmp" "$DSJOBS_STATUS"; } 2>/dev/null \
    || { { [ -f "$DSJOBS_STATUS" ] || rm -f "$DSJOBS_STATUS"; } 2>/dev/null; dsjobs_status_text "$@" >"$DSJOBS_STATUS"; }
}

# What the program finds on a machine of its instance type's size, unless the image or the job says
# otherwise: Python output unbuffered (its prints reach the logs as they are made, and a kill does
# not lose them); thread pools as wide as its CPUs (a container sees all of its node's, and
# OpenMP/BLAS would start that many threads against its CPU limit); a home it may write (a user id
# without one gets /) and a user name; open files up to the hard limit.
dsjobs_machine_env() {
  [ -n "${PYTHONUNBUFFERED+x}" ] || export PYTHONUNBUFFERED=1
  case "${DSJOBS_CPUS:-}" in
    ''|*[!0-9]*|0) ;;
    *)
      for dsjobs_v in OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS PYTHON_CPU_COUNT; do
        eval "[ -n \"\${$dsjobs_v+x}\" ] || export $dsjobs_v=\$DSJOBS_CPUS"
      done
      ;;
  esac
  if [ ! -w "${HOME:-/}" ]; then
    # The node's disk (as the image's /tmp) first: caches (models) would fill the shared volume.
    for dsjobs_h in "${TMPDIR:-/tmp}/dsjobs-home" "$DSJOBS_SHARED/home"; do
      if mkdir -p "$dsjobs_h" 2>/dev/null && [ -w "$dsjobs_h" ]; then
        export HOME="$dsjobs_h"
        break
      fi
    done
  fi
  if [ -z "${USER:-}${LOGNAME:-}" ] && command -v id >/dev/null 2>&1 && ! id -un >/dev/null 2>&1; then
    export USER=job LOGNAME=job
  fi
  # Up to 1048576: some nodes' hard limit is ~2^30, and programs that close every possible
  # descriptor (subprocess without close_fds support, rpm) crawl with that.
  dsjobs_n=$(ulimit -H -n 2>/dev/null) || dsjobs_n=''
  case "$dsjobs_n" in ''|*[!0-9]*) dsjobs_n=1048576 ;; esac
  [ "$dsjobs_n" -le 1048576 ] || dsjobs_n=1048576
  ulimit -S -n "$dsjobs_n" 2>/dev/null || :
}

# dsjobs_readable PATH: PATH (relative to the working directory) and what is below it readable by
# all, unless it is, or is under, a link leading out of the working directory (the ship uploads
# nothing from out there, and a mount's tree is not the job's to change). Links below it are left
# as they are (chmod -R does not follow them).
dsjobs_readable() {
  # The working directory's own path, resolved once for all the outputs.
  [ -n "${dsjobs_root:-}" ] || dsjobs_root=$(cd -P "$DSJOBS_WORK" 2>/dev/null && pwd -P) || return 0
  dsjobs_p="$DSJOBS_WORK/$1"
  [ -e "$dsjobs_p" ] && [ ! -L "$dsjobs_p" ] || return 0
  dsjobs_d=$(cd -P "${dsjobs_p%/*}" 2>/dev/null && pwd -P) || return 0
  case "$dsjobs_d/" in
    "$dsjobs_root"/*) chmod -R a+rX -- "$dsjobs_p" 2>/dev/null ;;
  esac
  return 0
}

# dsjobs_exit RC PHASE REASON EXIT_CODE
dsjobs_exit() {
  # Before the status: the ship sidecar reads the logs to their end once it sees the status.
  dsjobs_stop_sampler
  dsjobs_status "$1" "$2" "$3"
  # SIGKILL: the heartbeat ignores cancel signals.
  if [ -n "$DSJOBS_HB_PID" ]; then kill -s KILL "$DSJOBS_HB_PID" 2>/dev/null; fi
  exit "$4"
}

dsjobs_setup_failed() {
  dsjobs_log "setup failed: $1"
  printf 'dsjobs: %s\n' "$1" >&2
  dsjobs_exit '' setup "$1" "$DSJOBS_SETUP_FAILED_EXIT"
}

dsjobs_stop_killer() {
  if [ -n "$DSJOBS_KILLER" ]; then kill "$DSJOBS_KILLER" 2>/dev/null; DSJOBS_KILLER=''; fi
}

dsjobs_start_killer() {
  (
    exec </dev/null >/dev/null 2>&1 9>&-
    dsjobs_s=''
    dsjobs_w=''
    # SIGKILL for the sleep: a SIGTERM that reaches it just after its fork, while it still has this
    # subshell's trap, is dropped when dash or busybox resets the traps (the timer then ran out).
    trap 'kill -s KILL "$dsjobs_s" "$dsjobs_w" 2>/dev/null; exit 0' TERM
    sleep "$DSJOBS_GRACE_TIMEOUT" &
    dsjobs_s=$!
    # A forced cancel cuts the timeout short: the pod's deletion gives the same grace either way (the
    # runner needs it to store the logs), so ship makes $DSJOBS_KILL_NOW when the operator says so.
    # It ends with the timer's sleep too, should this subshell be killed outright (no trap).
    (
      while [ ! -e "$DSJOBS_KILL_NOW" ] && kill -0 "$dsjobs_s" 2>/dev/null; do sleep 1; done
      if [ -e "$DSJOBS_KILL_NOW" ]; then kill -s KILL "$dsjobs_s" 2>/dev/null; fi
    ) &
    dsjobs_w=$!
    wait "$dsjobs_s"
    kill "$dsjobs_w" 2>/dev/null
    if [ -e "$DSJOBS_KILL_NOW" ]; then
      dsjobs_log "cancel forced: sending SIGKILL to the program"
    else
      dsjobs_log "graceful shutdown timeout (${DSJOBS_GRACE_TIMEOUT}s) expired: sending SIGKILL"
    fi
    dsjobs_kill KILL "$DSJOBS_PID"
  ) &
  DSJOBS_KILLER=$!
}

# The cancel signals' trap; also called right after pip or the program is started, for a signal
# that came before `DSJOBS_PID=$!` and so found nothing to stop (dsjobs_deliver_pending).
dsjobs_on_signal() {
  DSJOBS_CANCEL=1
  [ -n "$DSJOBS_PID" ] || return 0
  # Once per started process, though this may run twice for it (the trap, then the pending
  # check; or a second signal): the ticket is taken and compared in one command, and a trap runs
  # only between commands, so exactly one of the runs finds 1.
  [ "$((DSJOBS_SIGNALLED += 1))" = 1 ] || return 0
  dsjobs_await_fork
  if [ "$DSJOBS_PHASE" != run ]; then
    dsjobs_kill TERM "$DSJOBS_PID"
    return 0
  fi
  if [ -n "$DSJOBS_GRACE_SIG" ]; then
    dsjobs_log "cancel: sending SIG$DSJOBS_GRACE_SIG to the program, SIGKILL in ${DSJOBS_GRACE_TIMEOUT}s"
    dsjobs_kill "$DSJOBS_GRACE_SIG" "$DSJOBS_PID"
    dsjobs_start_killer
  else
    dsjobs_log "cancel: no graceful shutdown configured: sending SIGKILL to the program"
    dsjobs_kill KILL "$DSJOBS_PID"
  fi
}

# Before a cancel goes to $DSJOBS_PID: a subshell forked a moment ago still has this script's trap
# until it resets it (dash and busybox do so just after fork, and drop a signal caught meanwhile),
# and it has not opened the program's output FIFOs yet (killed before that, it would leave the tees
# waiting for a writer until the drain deadline). Its first command, after both, leaves the file
# $DSJOBS_FORKED: wait for that, for its end, or - a file it could not make - about 5 s.
dsjobs_await_fork() {
  dsjobs_n=0
  while [ ! -e "$DSJOBS_FORKED" ] && [ "$dsjobs_n" -lt 50 ] && kill -0 "$DSJOBS_PID" 2>/dev/null; do
    sleep 0.1 2>/dev/null || sleep 1
    dsjobs_n=$((dsjobs_n + 1))
  done
}

# Right after `DSJOBS_PID=$!`: a cancel that came while the process was being started found no
# DSJOBS_PID and only set DSJOBS_CANCEL; the process gets now what the trap would have sent it.
dsjobs_deliver_pending() {
  if [ "$DSJOBS_CANCEL" = 1 ]; then dsjobs_on_signal; fi
}

# Waits for $DSJOBS_PID, sets DSJOBS_RC. A trapped signal interrupts `wait` (status > 128) while the
# program still runs: wait again. If it ended meanwhile, a second `wait` returns its real status.
dsjobs_wait() {
  while :; do
    wait "$DSJOBS_PID"
    DSJOBS_RC=$?
    if [ "$DSJOBS_CANCEL" = 1 ] && [ "$DSJOBS_RC" -gt 128 ]; then
      if kill -0 "$DSJOBS_PID" 2>/dev/null; then continue; fi
      wait "$DSJOBS_PID" 2>/dev/null
      dsjobs_r=$?
      if [ "$dsjobs_r" -ne 127 ]; then DSJOBS_RC=$dsjobs_r; fi
    fi
    break
  done
}

dsjobs_heartbeat() {
  trap '' TERM INT HUP
  dsjobs_n=0
  while kill -0 "$1" 2>/dev/null; do
    dsjobs_n=$((dsjobs_n + 1))
    # Fixed width, in place: the same blocks every beat, even on a full disk.
    printf '%012d\n' "$dsjobs_n" 1<>"$DSJOBS_HB"
    sleep "$DSJOBS_HB_SECONDS"
  done
}

"""
    + _SAMPLER
    + r"""trap dsjobs_on_signal TERM INT HUP
mkdir -p "$DSJOBS_RUN" "$(dirname "$DSJOBS_SYSLOG")" 2>/dev/null
# The system log is shared with the runner's uid: stage-in made it 0666; made here, umask 0 keeps
# it so. If this uid cannot append to it, its lines are lost (to /dev/null), never the job.
if ! ( umask 0; : >>"$DSJOBS_SYSLOG" ) 2>/dev/null; then DSJOBS_SYSLOG_TO=/dev/null; fi
# Room for the status file, taken now (see dsjobs_status): lines without '=' are not read.
printf '%4095s\n' '' >"$DSJOBS_STATUS.tmp" 2>/dev/null
# Held open while this shell lives (never by what it starts): ship's read of the FIFO sees EOF
# only once this process is gone, not when it merely stalls (a heartbeat can stop for minutes
# while the container thrashes near its memory limit).
if [ -p "$DSJOBS_ALIVE" ]; then { command exec 9<>"$DSJOBS_ALIVE"; } 2>/dev/null || :; fi
echo "$$" >"$DSJOBS_STARTED"
# Helpers run as subshells that drop our stdout/stderr first: a shell running a *function* with
# redirections keeps a saved copy of the original descriptors, which would hold the container's
# output pipes open after this script has exited.
( exec </dev/null >/dev/null 2>&1 9>&-; dsjobs_heartbeat "$$" ) &
DSJOBS_HB_PID=$!
( exec </dev/null >/dev/null 2>&1 9>&-; dsjobs_sampler "$$" ) &
DSJOBS_STATS_PID=$!
dsjobs_log "started"
cd "$DSJOBS_WORK" || dsjobs_setup_failed "cannot enter the working directory $DSJOBS_WORK"
"""
)

# The interpreter is looked up and run with the job's environment (its PATH, PYTHONHOME...).
_PYTHON_FIND = r"""
DSJOBS_PY=$(dsjobs_job_env; for dsjobs_c in python3 python; do command -v "$dsjobs_c" && break; done) 2>/dev/null
[ -n "$DSJOBS_PY" ] || dsjobs_setup_failed "the job has a Python environment but the image has no python3"
DSJOBS_PYVER=$(dsjobs_job_env; exec "$DSJOBS_PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>>"$DSJOBS_SYSLOG_TO") \
  || dsjobs_setup_failed "cannot run $DSJOBS_PY"
"""

# The image interpreter's site dirs as a .pth line for the job's venv, where pip decides what to
# install: `site.addsitedir` runs their own .pth files (editable installs, namespace packages), and
# an image whose Python is itself a venv (/opt/venv) keeps its packages, which
# --system-site-packages (the base interpreter's) would lose. Each start appends them anew (a
# known-paths set of its own): pip's isolated build environment re-reads the venv's site dir to
# learn which paths are the environment's and drops them, so an sdist is built with its declared
# build requirements, not the image's setuptools. The user site (first, as Python puts it) is
# worked out at each start (HOME, PYTHONUSERBASE, `-s`), as the image's interpreter would.
# (No comprehension or lambda: a .pth line runs in exec, whose locals those do not see.)
_IMAGE_SITES_PY = """import os, site, sys
d = [p for p in getattr(site, "getsitepackages", lambda: [])() if os.path.isdir(p)]
d = d or [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
line = "import site, sys; k = set(); "
if site.ENABLE_USER_SITE:
    line += "sys.flags.no_user_site or site.addsitedir(site.getusersitepackages(), k); "
print(line + "list(map(site.addsitedir, %r, [k] * %d))" % (d, len(d)))"""

# pip installs the requirements with what the image has in view: it runs in a virtual environment
# that sees the image's packages, skips what the image has in a matching version (a pytorch
# image's torch is not downloaded again) and installs what it lacks or has in another version into
# the venv, never over the image's. The program still runs the image's interpreter (its sys.prefix,
# wrappers and data paths as they were), with the venv's site dir first on PYTHONPATH. Anything
# short of a venv whose interpreter imports the image's pip: pip installs every requirement with
# --target, as before (it cannot tell what the image has).
_VENV = r"""
DSJOBS_PIP_PY=$DSJOBS_PY
DSJOBS_PYBIN=$DSJOBS_SITE/bin
dsjobs_venv_site=''
if ( dsjobs_job_env; exec "$DSJOBS_PY" -m venv --without-pip "$DSJOBS_VENV" ) </dev/null >>"$DSJOBS_SYSLOG_TO" 2>&1 \
  && dsjobs_venv_site=$(dsjobs_job_env; exec "$DSJOBS_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' </dev/null 2>>"$DSJOBS_SYSLOG_TO") \
  && [ -d "$dsjobs_venv_site" ] \
  && ( dsjobs_job_env; exec "$DSJOBS_PY" -c "$DSJOBS_IMAGE_SITES" </dev/null 2>>"$DSJOBS_SYSLOG_TO" ) >"$dsjobs_venv_site/00-dsjobs-image.pth" \
  && ( dsjobs_job_env; exec "$DSJOBS_VENV/bin/python" -c 'import pip' ) </dev/null >>"$DSJOBS_SYSLOG_TO" 2>&1
then
  # Its activate scripts are no one's: `source activate env` (conda's) must not find them.
  rm -f "$DSJOBS_VENV/bin/activate" "$DSJOBS_VENV/bin/activate.csh" "$DSJOBS_VENV/bin/activate.fish" \
    "$DSJOBS_VENV/bin/Activate.ps1" 2>/dev/null
  DSJOBS_PIP_PY=$DSJOBS_VENV/bin/python
  DSJOBS_SITE=$dsjobs_venv_site
  DSJOBS_PYBIN=$DSJOBS_VENV/bin
  dsjobs_log "pip installs what the image lacks, into $DSJOBS_VENV"
else
  dsjobs_log "no virtual environment over the image's packages: pip installs every requirement into $DSJOBS_SITE"
  set -- "$@" --target "$DSJOBS_SITE"
  DSJOBS_PIP_ARGS="$DSJOBS_PIP_ARGS --target $DSJOBS_SITE"
fi
"""

_PIP_RUN = r"""
# A cancel during the python checks (a trap runs once the probe's output is read): no pip at all.
if [ "$DSJOBS_CANCEL" = 1 ]; then
  dsjobs_log "cancelled before pip started"
  dsjobs_exit '' cancelled "cancelled during setup" "$DSJOBS_CANCELLED_EXIT"
fi
dsjobs_log "installing requirements: $DSJOBS_PIP_PY $DSJOBS_PIP_ARGS"
# Where pip's lines start in the system log: its first error line is told in the job's status.
dsjobs_pip_from=$( { wc -c <"$DSJOBS_SYSLOG_TO"; } 2>/dev/null) || dsjobs_pip_from=''
DSJOBS_PHASE=pip
DSJOBS_FORKED=$DSJOBS_RUN/pip.forked
rm -f "$DSJOBS_FORKED" 2>/dev/null
# (`true`, not `:`: a failed redirection of a special builtin ends a dash subshell.)
( { true >"$DSJOBS_FORKED"; } 2>/dev/null; dsjobs_job_env; exec "$DSJOBS_PIP_PY" "$@" ) </dev/null >>"$DSJOBS_SYSLOG_TO" 2>&1 9>&- &
DSJOBS_PID=$!
dsjobs_deliver_pending
dsjobs_wait
DSJOBS_PID=''
# The program, started next, gets a ticket of its own (dsjobs_on_signal).
DSJOBS_SIGNALLED=0
DSJOBS_PHASE=setup
if [ "$DSJOBS_CANCEL" = 1 ]; then dsjobs_exit '' cancelled "cancelled during setup" "$DSJOBS_CANCELLED_EXIT"; fi
if [ "$DSJOBS_RC" != 0 ]; then
  # pip's own words (e.g. "ERROR: No matching distribution found for x==1"), where the tools exist.
  dsjobs_pip_error=''
  case $dsjobs_pip_from in
    '' | *[!0-9\ ]*) ;;
    *) dsjobs_pip_error=$(tail -c +"$((dsjobs_pip_from + 1))" "$DSJOBS_SYSLOG_TO" 2>/dev/null \
      | grep '^ERROR: ' 2>/dev/null | head -n 1 | cut -c 1-500 2>/dev/null) || dsjobs_pip_error='' ;;
  esac
  dsjobs_setup_failed "pip install failed with exit code $DSJOBS_RC${dsjobs_pip_error:+: $dsjobs_pip_error} (details in .system.log)"
fi
dsjobs_log "requirements installed"
"""

_RUN = r"""
# Program output: a FIFO per stream into a tee that appends to the log file and copies to the
# container log. The tees ignore cancel signals: they end at EOF, after the program.
DSJOBS_OUT_TO=$DSJOBS_OUT
DSJOBS_ERR_TO=$DSJOBS_ERR
if command -v mkfifo >/dev/null 2>&1 && command -v tee >/dev/null 2>&1; then
  rm -f "$DSJOBS_RUN/out.fifo" "$DSJOBS_RUN/err.fifo"
  if mkfifo "$DSJOBS_RUN/out.fifo" "$DSJOBS_RUN/err.fifo"; then
    ( trap '' TERM INT HUP; exec tee -a "$DSJOBS_OUT" ) <"$DSJOBS_RUN/out.fifo" 9>&- &
    DSJOBS_TEES=$!
    ( trap '' TERM INT HUP; exec tee -a "$DSJOBS_ERR" >&2 ) <"$DSJOBS_RUN/err.fifo" 9>&- &
    DSJOBS_TEES="$DSJOBS_TEES $!"
    DSJOBS_OUT_TO=$DSJOBS_RUN/out.fifo
    DSJOBS_ERR_TO=$DSJOBS_RUN/err.fifo
  fi
else
  dsjobs_log "tee or mkfifo missing: program output goes to the log files only"
fi

# The launcher's tools are found on the image's PATH, before the job's own PATH applies.
DSJOBS_SHELL=$(command -v bash || command -v sh) 2>/dev/null || DSJOBS_SHELL=/bin/sh
set -- "$DSJOBS_SHELL" -c "$DSJOBS_CMD"
# Project secrets whose names are no shell names (hf-token): this script's shell dropped them
# from its environment (dash does, as any POSIX shell may), so `env` passes them on, read from
# the Secret's files (their values as stored, trailing newlines kept). bash keeps them for the
# program; an image without bash runs it under sh, which drops them again.
DSJOBS_ODD_SECRETS=0
if [ -n "${DSJOBS_PROJECT_SECRETS:-}" ] && [ -d "$DSJOBS_PROJECT_SECRETS" ]; then
  for dsjobs_f in "$DSJOBS_PROJECT_SECRETS"/* "$DSJOBS_PROJECT_SECRETS"/.[!.]*; do
    dsjobs_k=${dsjobs_f##*/}
    case $dsjobs_k in
      *=*) continue ;;
      [0-9]*|*[!A-Za-z0-9_]*) ;;
      *) continue ;;  # a shell name: the pod's environment has it
    esac
    [ -f "$dsjobs_f" ] && dsjobs_v=$(cat "$dsjobs_f" && echo x) 2>/dev/null || continue
    set -- "$dsjobs_k=${dsjobs_v%x}" "$@"
    DSJOBS_ODD_SECRETS=$((DSJOBS_ODD_SECRETS + 1))
  done
  # After env's options: a key may start with '-' (`-S=...` would be read as env's option).
  if [ "$DSJOBS_ODD_SECRETS" -gt 0 ]; then set -- -- "$@"; fi
  if [ "$DSJOBS_ODD_SECRETS" -gt 0 ] && [ "${DSJOBS_SHELL##*/}" != bash ]; then
    dsjobs_log "warning: $DSJOBS_ODD_SECRETS project secrets whose names are no shell names do not reach the program: the image has no bash, and its $DSJOBS_SHELL drops such names from the environment (dash and busybox do)"
  fi
fi
DSJOBS_ENV_BIN=$(command -v env) 2>/dev/null || DSJOBS_ENV_BIN=''
if [ -n "$DSJOBS_ENV_BIN" ] && "$DSJOBS_ENV_BIN" --default-signal=INT,QUIT true >/dev/null 2>&1; then
  set -- "$DSJOBS_ENV_BIN" --default-signal=INT,QUIT "$@"
else
  if [ "$DSJOBS_ODD_SECRETS" -gt 0 ]; then
    if [ -n "$DSJOBS_ENV_BIN" ]; then
      set -- "$DSJOBS_ENV_BIN" "$@"
    else
      dsjobs_log "warning: $DSJOBS_ODD_SECRETS project secrets whose names are no shell names not passed (no env in the image)"
      shift "$((DSJOBS_ODD_SECRETS + 1))"
    fi
  fi
  if [ "$DSJOBS_GRACE_SIG" = INT ]; then
    # The trampoline runs with the job's environment (PYTHONHOME...): found with it too.
    if [ -z "$DSJOBS_PY" ]; then DSJOBS_PY=$(dsjobs_job_env; command -v python3) 2>/dev/null || DSJOBS_PY=''; fi
    if [ -n "$DSJOBS_PY" ]; then
      set -- "$DSJOBS_PY" -c "$DSJOBS_TRAMPOLINE" "$@"
    else
      dsjobs_log "warning: cannot reset SIGINT for the program (no env --default-signal, no python3)"
    fi
  fi
fi
if DSJOBS_SETSID_BIN=$(command -v setsid) 2>/dev/null; then
  set -- "$DSJOBS_SETSID_BIN" "$@"
  DSJOBS_SETSID=1
fi

if [ "$DSJOBS_CANCEL" = 1 ]; then
  dsjobs_log "cancelled before the program started"
  if [ -n "$DSJOBS_TEES" ]; then kill -s KILL $DSJOBS_TEES 2>/dev/null; fi
  dsjobs_exit '' cancelled "cancelled before the program started" "$DSJOBS_CANCELLED_EXIT"
fi
DSJOBS_PHASE=run
DSJOBS_FORKED=$DSJOBS_RUN/program.forked
rm -f "$DSJOBS_FORKED" 2>/dev/null
if [ -f "$DSJOBS_SYSLOG_TO" ] && { command exec 8>>"$DSJOBS_SYSLOG_TO"; } 2>/dev/null; then
  DSJOBS_SYSLOG_FD=8
fi
( { true >"$DSJOBS_FORKED"; } 2>/dev/null; dsjobs_machine_env; dsjobs_job_env; dsjobs_program_env; exec "$@" ) </dev/null >>"$DSJOBS_OUT_TO" 2>>"$DSJOBS_ERR_TO" 8>&- 9>&- &
DSJOBS_PID=$!
dsjobs_deliver_pending
dsjobs_log "program started (pid $DSJOBS_PID, $DSJOBS_SHELL): $DSJOBS_CMD"
dsjobs_wait
DSJOBS_PROG_RC=$DSJOBS_RC
# A graceful cancel went to the whole process group: a shell running the program (`bash run.sh`,
# `python a.py; echo done`) dies of it at once, while the program it started saves its work. The
# group has until the graceful-shutdown timeout, whose timer SIGKILLs what is left of it then.
if [ "$DSJOBS_SETSID" = 1 ] && [ -n "$DSJOBS_KILLER" ]; then
  while dsjobs_kill 0 "$DSJOBS_PID" && kill -0 "$DSJOBS_KILLER" 2>/dev/null; do
    sleep 0.1 2>/dev/null || sleep 1
  done
fi
# Leftovers of the program's session die with it, as they would with the container.
if [ "$DSJOBS_SETSID" = 1 ]; then dsjobs_kill KILL "$DSJOBS_PID"; fi
DSJOBS_PID=''
dsjobs_stop_killer

if [ -n "$DSJOBS_TEES" ]; then
  # The tees ignore cancel signals, so the deadline is enforced with SIGKILL.
  # (`true`, not `:`: a failed redirection of a special builtin ends a dash subshell, and the tees
  # would then wait for good; the program may have deleted the run dir.)
  rm -f "$DSJOBS_RUN/tees.cut" 2>/dev/null
  ( exec </dev/null >/dev/null 2>&1 9>&-; sleep "$DSJOBS_TEE_DRAIN"; { true >"$DSJOBS_RUN/tees.cut"; } 2>/dev/null; kill -s KILL $DSJOBS_TEES ) &
  dsjobs_tw=$!
  # A tee that could not write (its log file's disk full) goes on copying to the container log
  # and exits 1 at the end: what it could not write is missing from the file, which the shipped
  # logs would not say. Over 125: a signal (the drain deadline's, told below), a wait cut short by
  # one of ours, or 127 from a shell that had reaped the tee before (bash) and forgot it.
  dsjobs_stream=out
  for dsjobs_t in $DSJOBS_TEES; do
    dsjobs_st=''
    while kill -0 "$dsjobs_t" 2>/dev/null; do wait "$dsjobs_t"; dsjobs_st=$?; done
    if [ -z "$dsjobs_st" ]; then wait "$dsjobs_t" 2>/dev/null; dsjobs_st=$?; fi
    if [ "$dsjobs_st" -gt 0 ] && [ "$dsjobs_st" -le 125 ]; then
      DSJOBS_LOGS_CUT="$DSJOBS_LOGS_CUT${DSJOBS_LOGS_CUT:+,}$dsjobs_stream"
      dsjobs_log "the program's std$dsjobs_stream could not all be written to its log file (tee exited with $dsjobs_st: the job's disk full?); what it printed from then on is only in the container log"
    fi
    dsjobs_stream=err
  done
  kill "$dsjobs_tw" 2>/dev/null
  if [ -e "$DSJOBS_RUN/tees.cut" ]; then
    dsjobs_log "the program's output was still held open ${DSJOBS_TEE_DRAIN}s after it ended, by a process it left running (a daemon, a setsid child): what that process writes from now on is not in the logs"
  fi
  rm -f "$DSJOBS_RUN/out.fifo" "$DSJOBS_RUN/err.fifo" "$DSJOBS_RUN/tees.cut"
fi
dsjobs_outputs_readable
dsjobs_log "program exited with code $DSJOBS_PROG_RC"
dsjobs_exit "$DSJOBS_PROG_RC" run '' "$DSJOBS_PROG_RC"
"""


def _q(value: str) -> str:
    return shlex.quote(value)


def _assign(name: str, value: str | int) -> str:
    return f"{name}={_q(str(value))}"


def _version_case(version: str) -> str:
    # "3.11" matches 3.11 and 3.11.x; "3.11.4" only itself. '.' is literal in case patterns.
    parts = version.split(".")
    patterns = version if len(parts) == 3 else f"{version}|{version}.*"
    return (
        f'case "$DSJOBS_PYVER" in\n'
        f'  {patterns}) dsjobs_log "python $DSJOBS_PYVER ($DSJOBS_PY) matches the requested {version}" ;;\n'
        f'  *) dsjobs_setup_failed "python {version} was requested but the image has python $DSJOBS_PYVER" ;;\n'
        f"esac\n"
    )


#: The user-info part of a URL (`user:password@`, `token@`).
_URL_USERINFO = re.compile(r"(?<=://)([^/@\s:]*)(:[^/@\s]*)?@")


def redact_url_credentials(text: str) -> str:
    """`text` with the secrets of URLs hidden as pip hides them in its own log (`user:****@`, a
    lone user being a token: `****@`): the system log is kept as one of the job's log files."""
    return _URL_USERINFO.sub(lambda m: f"{m[1]}:****@" if m[2] is not None else "****@", text)


def pip_arguments(config: RunnerConfig) -> list[str]:
    """The argv after the interpreter for installing the job's requirements (into the interpreter's
    environment: the entry script adds `--target` when it could not make the job's venv)."""
    env = config.python_env
    assert env is not None
    layout = config.layout
    args = _PIP_BASE.split()
    if env.pip.index_url:
        args += ["--index-url", env.pip.index_url]
    for url in env.pip.extra_index_urls:
        args += ["--extra-index-url", url]
    for host in env.pip.trusted_hosts:
        args += ["--trusted-host", host]
    if env.pip.no_deps:
        args.append("--no-deps")
    args += ["-r", str(layout.requirements)]
    return args


def render_entry_script(
    config: RunnerConfig,
    *,
    cgroup_fs: str = "/sys/fs/cgroup",
    proc: str = "/proc",
    stats_seconds: int = STATS_SECONDS,
) -> str:
    """The job container's script. `cgroup_fs` and `proc` are where it reads its resource usage
    (tests point them at fakes)."""
    layout = config.layout
    grace = config.graceful_shutdown
    lines = [
        _PROLOGUE.split("\nset -u\n", 1)[0],
        "set -u",
        "",
        "# Paths and parameters of this job.",
        _assign("DSJOBS_SHARED", str(layout.root)),
        _assign("DSJOBS_WORK", str(config.work_dir)),
        _assign("DSJOBS_RUN", str(layout.run_dir)),
        _assign("DSJOBS_KILL_NOW", str(layout.kill_now)),
        _assign("DSJOBS_OUT", str(layout.stdout)),
        _assign("DSJOBS_ERR", str(layout.stderr)),
        _assign("DSJOBS_SYSLOG", str(layout.system_log)),
        _assign("DSJOBS_STATUS", str(layout.status)),
        _assign("DSJOBS_HB", str(layout.heartbeat)),
        _assign("DSJOBS_STARTED", str(layout.started)),
        _assign("DSJOBS_ALIVE", str(layout.alive)),
        _assign("DSJOBS_HB_SECONDS", HEARTBEAT_SECONDS),
        _assign("DSJOBS_DOCKER_STATS", str(layout.docker_stats)),
        _assign("DSJOBS_GPU_STATS", str(layout.gpu_stats)),
        _assign("DSJOBS_STATS_PREV", str(layout.stats_prev)),
        _assign("DSJOBS_STATS_SECONDS", stats_seconds),
        _assign("DSJOBS_DOCKER_STATS_HEADER", "\t".join(DOCKER_STATS_HEADER)),
        _assign("DSJOBS_GPU_STATS_HEADER", "\t".join(("time", *GPU_STATS_QUERY))),
        _assign("DSJOBS_GPU_QUERY", ",".join(GPU_STATS_QUERY)),
        _assign("DSJOBS_CGROUP_FS", cgroup_fs),
        _assign("DSJOBS_PROC", proc),
        _assign("DSJOBS_TEE_DRAIN", TEE_DRAIN_SECONDS),
        _assign("DSJOBS_SETUP_FAILED_EXIT", SETUP_FAILED_EXIT),
        _assign("DSJOBS_CANCELLED_EXIT", CANCELLED_EXIT),
        _assign("DSJOBS_GRACE_SIG", grace.signal_name if grace else ""),
        _assign("DSJOBS_GRACE_TIMEOUT", math.ceil(grace.timeout_seconds) if grace else 0),
        _assign("DSJOBS_TRAMPOLINE", _PY_TRAMPOLINE),
        _assign("DSJOBS_CMD", render_config_cmd(config)),
        _PROLOGUE.split("\nset -u\n", 1)[1],
        "# The job's environment: applied only in the subshells that become the program, its",
        "# Python lookup and pip. The script's own tools keep the image's PATH and the shell's IFS.",
        "dsjobs_job_env() {",
    ]
    for name, value in config.env.items():
        lines.append(f"  export {name}={_q(value)}")
    lines.append(f"  export {ENV_PROGRESS_FILE}={_q(str(layout.progress))}")
    if config.project_disk_path:
        lines.append(f"  export {ENV_PROJECT_HOME}={_q(config.project_disk_path)}")
    lines.append("}")
    program_env: list[str] = []

    env = config.python_env
    if env is not None:
        lines.append("\n# Python environment.")
        lines.append(_PYTHON_FIND.strip("\n"))
        if env.python_version:
            lines.append(_version_case(env.python_version).rstrip("\n"))
        else:
            lines.append('dsjobs_log "python $DSJOBS_PYVER ($DSJOBS_PY)"')
        if env.requirements:
            args = pip_arguments(config)
            lines.append(_assign("DSJOBS_VENV", str(layout.venv_dir)))
            lines.append(_assign("DSJOBS_SITE", str(layout.site_dir)))
            lines.append(_assign("DSJOBS_IMAGE_SITES", _IMAGE_SITES_PY))
            lines.append("set -- " + " ".join(_q(a) for a in args))
            lines.append(_assign("DSJOBS_PIP_ARGS", redact_url_credentials(" ".join(args))))
            lines.append(_VENV.strip("\n"))
            lines.append(_PIP_RUN.strip("\n"))
    requirements = env is not None and bool(env.requirements)
    pypath = [_q(str(layout.module_dir(i))) for i in range(len(config.local_modules))]
    if requirements:
        pypath.append('"$DSJOBS_SITE"')
    if pypath:
        program_env.append("PYTHONPATH=" + ":".join(pypath) + "${PYTHONPATH:+:$PYTHONPATH}")
        program_env.append("export PYTHONPATH")
    if requirements:
        # Last: the requirements' scripts the image lacks, not the venv's python over the image's.
        program_env.append('PATH="${PATH:-/usr/local/bin:/usr/bin:/bin}":"$DSJOBS_PYBIN"')
        program_env.append("export PATH")
    lines.append(
        "\n# The outputs readable by the ship sidecar, which runs as a user of its own: a program that"
        "\n# saved a file through a temporary one (0600) or a directory made by mkdtemp (0700) would"
        "\n# have it fail to upload. The program's own user, so nothing it could not do itself."
    )
    lines.append("dsjobs_outputs_readable() {")
    lines.extend(f"  dsjobs_readable {_q(o.path)}" for o in config.outputs)
    lines.append("  return 0")
    lines.append("}")
    lines.append("\n# What the job's Python environment adds for the program, over the job's environment.")
    lines.append("dsjobs_program_env() {")
    lines.extend(f"  {line}" for line in program_env or [":"])
    lines.append("}")
    lines.append(_RUN.rstrip("\n"))
    return "\n".join(lines) + "\n"
