#!/usr/bin/env bash
# Cloud TPU VM for llmjax: create it, install llmjax on every worker, launch, follow, delete.
#
#   tools/tpu.sh --name=lm1 --zone=us-central2-b --type=v4-32 --runtime=tpu-ubuntu2204-base create
#   tools/tpu.sh --name=lm1 --zone=us-central2-b install      # copies this checkout (a tarball)
#   tools/tpu.sh --name=lm1 --zone=us-central2-b --repo=https://github.com/ORG/llmjax install
#   tools/tpu.sh --name=lm1 --zone=us-central2-b --type=v4-32 --config=experiments/gpt.py:small \
#       --workdir=gs://BUCKET/runs/gpt_small launch -- --config.train.steps=20000
#   tools/tpu.sh --name=lm1 --zone=us-central2-b logs         # tail -f of worker 0's log
#   tools/tpu.sh --name=lm1 --zone=us-central2-b status       # running, finished, stopped, failed
#   tools/tpu.sh --name=lm1 --zone=us-central2-b stop         # SIGTERM: checkpoint, stop, status
#   tools/tpu.sh --name=lm1 --zone=us-central2-b delete [-- --quiet]
#
# Settings, as a flag or an environment variable of the same name in capitals:
#   --name NAME        the TPU VM (required)
#   --zone ZONE        its zone, e.g. us-central2-b (required)
#   --type TYPE        accelerator type, e.g. v4-32, v5litepod-16, v6e-8 (create; launch uses
#                      it to tell a single-host slice from a multi-host one)
#   --runtime RUNTIME  software version (create): tpu-ubuntu2204-base for v4,
#                      v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e
#   --project PROJECT  Google Cloud project; default: gcloud's configured one
#   --repo REPO        install: git URL to clone on the workers; default: copy this checkout
#   --config CONFIG    launch: EXPERIMENT[:variant] for llmjax.main (required by launch)
#   --workdir WORKDIR  launch: the run's workdir (required): gs://BUCKET/PATH on a pod; a
#                      local path only on a single-host slice
#   --worker WORKER    logs: which worker's log (default 0; "all" for every worker)
#   --dry-run          or DRY_RUN=1: print each command instead of running it
# A missing required setting is an error naming it (exit 2). Arguments after `--` go to
# llmjax.main for launch and to gcloud for create and delete.
#
# install puts llmjax in ~/llmjax with a virtualenv ~/llmjax/.venv on every worker: Python
# 3.12 from uv (the Ubuntu 22.04 runtimes have Python 3.10; JAX needs 3.11 or later), then
# `pip install -e . "jax[tpu]"`. launch runs the same command on every worker, in the
# background under nohup with its output in ~/llmjax.log: llmjax.main initializes
# jax.distributed by itself on Cloud TPU (it sees TPU_WORKER_HOSTNAMES / CLOUD_TPU_TASK_ID),
# so every worker joins one job with no coordinator flags.
#
# The run's state on each worker: `status` says, per worker, whether llmjax.main is running
# there and, when it is not, what its exit status (kept in ~/llmjax.exit) means: 0 finished;
# 130 / 143 stopped by SIGINT / SIGTERM after saving the step in flight, so the same launch
# resumes it; any other status failed, with the last line of its log; no status at all
# (killed by SIGKILL, a preemption or a reboot) also resumes from the last checkpoint with
# the same launch. `stop` sends SIGTERM to every worker's run, waits (up to 10 minutes) for
# it to save and exit, and prints the same status.
#
# The workdir on a pod: every host writes its own shards of each checkpoint, so all of them
# must write to one place they all see: a Cloud Storage bucket, --workdir=gs://BUCKET/PATH.
# Before launching, launch checks from every worker (one ssh --worker=all) that the VM's
# service account can write and delete an object under that path with `gcloud storage`
# (installed on the TPU VM images; grant the account e.g. roles/storage.objectAdmin on the
# bucket). A worker that cannot prints (N: its agent-worker-number)
#   tpu.sh: gs://BUCKET is not writable from worker N: <gcloud's last error line>
# and nothing is launched (exit 1). A local --workdir is refused (exit 2) on a multi-host
# slice: each host would write its shards to its own disk, and no disk would hold a whole
# checkpoint. Multi-host means more than 8 in the type's count: v2/v3/v4/v5p-N count
# TensorCores (2 a chip, 4 chips a host: v4-8 and v5p-8 are one host, v4-16 two), v5litepod-N
# and v6e-N count chips (up to 8 a host: v5litepod-8 and v6e-8 are one host). Without
# --type (or with a type not in that list) launch counts the slice's hosts with
# `gcloud compute tpus tpu-vm describe`; a dry run cannot, so it prints that command and
# says the host count is unknown.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=${NAME:-} ZONE=${ZONE:-} TYPE=${TYPE:-} RUNTIME=${RUNTIME:-} PROJECT=${PROJECT:-}
REPO=${REPO:-} CONFIG=${CONFIG:-} WORKDIR=${WORKDIR:-} WORKER=${WORKER:-0}
DRY_RUN=${DRY_RUN:-0}
LOG=llmjax.log EXIT=llmjax.exit
# llmjax.main's own processes: the command line starts with the interpreter (never the shell
# that launch wraps around it to keep its exit status).
RUNNING="pgrep -f '^[^ ]*python[0-9.]* -m llmjax[.]main' >/dev/null"
LAST_LINE="awk 'NF { l = \$0 } END { print l }'"  # of its input, or a file: the last non-empty line
PYTHON_VERSION=3.12

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit "${1:-2}"
}

die() {
  echo "tpu.sh: $*" >&2
  exit 2
}

quote() {  # the arguments as one shell line: plain words as they are, others single-quoted
  local out="" a flag
  for a in "$@"; do
    flag=""
    if [[ $a =~ ^--[A-Za-z0-9_.-]+= ]]; then  # --flag='value' rather than '--flag=value'
      flag=${BASH_REMATCH[0]} a=${a#*=}
    fi
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$flag$a "
    else
      out+="$flag'${a//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

run() {  # runs the command, or prints it with --dry-run
  if [[ $DRY_RUN == 1 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

need() {  # exits 2 naming the first of the settings that is empty
  local setting flag
  for setting in "$@"; do
    if [[ -z ${!setting} ]]; then
      flag=$(echo "$setting" | tr '[:upper:]' '[:lower:]')
      die "missing $setting: give --$flag=... or set $setting (see tools/tpu.sh --help)"
    fi
  done
}

COMMAND="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name=*|--zone=*|--type=*|--runtime=*|--project=*|--repo=*|--config=*|--workdir=*|--worker=*)
      setting=$(echo "${1%%=*}" | tr -d '-' | tr '[:lower:]' '[:upper:]')
      printf -v "$setting" '%s' "${1#*=}" ;;
    --name|--zone|--type|--runtime|--project|--repo|--config|--workdir|--worker)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      setting=$(echo "$1" | tr -d '-' | tr '[:lower:]' '[:upper:]')
      printf -v "$setting" '%s' "$2"
      shift ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown flag $1 (see tools/tpu.sh --help)" ;;
    *) [[ -z $COMMAND ]] || die "one command at a time, got $COMMAND and $1"; COMMAND=$1 ;;
  esac
  shift
done
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got $DRY_RUN"

TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")

no_extra() {
  [[ ${#EXTRA[@]} -eq 0 ]] || die "$COMMAND takes no arguments after --"
}

multi_host() {  # yes, no, or nothing (unknown) for the accelerator type $1
  local count
  case $1 in
    # v2-v4 and v5p count TensorCores (2 a chip, 4 chips a host); v5e and v6e count chips
    # (up to 8 a host): either way more than 8 is more than one host.
    v2-*|v3-*|v4-*|v5p-*|v5litepod-*|v6e-*) count=${1#*-} ;;
    *) return 0 ;;
  esac
  [[ $count =~ ^[0-9]+$ ]] || return 0
  if (( 10#$count > 8 )); then echo yes; else echo no; fi
}

refuse_local_workdir_on_a_pod() {  # exits 2 when $WORKDIR is local and the slice multi-host
  local hosts slice describe endpoints count why
  hosts=$(multi_host "$TYPE") slice="$TYPE is a multi-host slice"
  if [[ -z $hosts ]]; then  # no --type, or one not in the table: ask gcloud for the hosts
    describe=("${TPU[@]}" describe "$NAME" "${WHERE[@]}"
              --format='value(networkEndpoints[].ipAddress)')
    if [[ $DRY_RUN == 1 ]]; then
      quote "${describe[@]}"
      why="no --type"
      [[ -z $TYPE ]] || why="--type=$TYPE is not one tpu.sh knows"
      echo "tpu.sh: dry run: $why, so the host count of $NAME is unknown; launch counts" \
        "its hosts with the describe above and refuses --workdir=$WORKDIR if it has more" \
        "than one" >&2
      return 0
    fi
    echo "+ $(quote "${describe[@]}")" >&2
    endpoints=$("${describe[@]}") \
      || { echo "tpu.sh: cannot count the hosts of $NAME (describe failed)" >&2; exit 1; }
    count=$(tr ';,' '  ' <<< "$endpoints" | wc -w)
    (( count > 0 )) || die "cannot count the hosts of $NAME (describe listed no" \
      "network endpoints); give --type=..., or a gs://BUCKET/PATH workdir"
    hosts=$( (( count > 1 )) && echo yes || echo no ) slice="$NAME has $count hosts"
  fi
  [[ $hosts == no ]] || die "--workdir=$WORKDIR is a local path, but $slice: each host" \
    "would write its checkpoint shards to its own disk and no disk would hold a whole" \
    "checkpoint; use --workdir=gs://BUCKET/PATH"
}

check_bucket() {  # one ssh to every worker: write, then delete, an object under $WORKDIR
  local bucket=${WORKDIR#gs://} probe check metadata
  bucket=gs://${bucket%%/*}
  [[ $bucket != gs:// ]] || die "--workdir=$WORKDIR names no bucket; give gs://BUCKET/PATH"
  probe=$(quote "${WORKDIR%/}/.tpu.sh-probe-")
  metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  check="w=\$(curl -sf -m 10 -H Metadata-Flavor:Google $metadata/agent-worker-number"
  check+=" || hostname); p=$probe\$w; f=\$(mktemp); ok=0"
  check+="; if ! command -v gcloud >/dev/null 2>&1; then e='no gcloud on this worker'"
  check+="; elif e=\$(gcloud storage cp --quiet \"\$f\" \"\$p\" 2>&1"
  check+=" && gcloud storage rm --quiet \"\$p\" 2>&1); then ok=1; fi; rm -f \"\$f\""
  check+="; if [ \$ok = 1 ]; then echo \"worker \$w: wrote and deleted \$p\""
  check+="; else echo \"tpu.sh: $bucket is not writable from worker \$w:"
  check+=" \$(printf '%s\\n' \"\$e\" | $LAST_LINE)\" >&2; exit 1; fi"
  run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$check" || {
    echo "tpu.sh: nothing launched: the check that $bucket is writable from every worker" \
      "failed (see above)" >&2
    exit 1
  }
}

status_script() {  # one line per worker: running, or what its run's exit status means
  local s="h=\$(hostname); if $RUNNING; then echo \"\$h: running\""
  s+="; elif [ ! -f ~/$EXIT ]; then echo \"\$h: not running and no exit status (never"
  s+=" launched, or killed: SIGKILL, a preemption, a reboot); the same launch resumes from"
  s+=" the last checkpoint\""
  s+="; else e=\$(cat ~/$EXIT); case \$e in"
  s+=" 0) echo \"\$h: finished (exit 0)\" ;;"
  s+=" 130|143) echo \"\$h: stopped by SIG\$([ \$e = 130 ] && echo INT || echo TERM) after"
  s+=" saving its last step (exit \$e); the same launch resumes it\" ;;"
  s+=" *) echo \"\$h: failed (exit \$e): \$($LAST_LINE ~/$LOG)\" ;;"
  s+=" esac; fi"
  echo "$s"
}

case $COMMAND in
  create)
    need NAME ZONE TYPE RUNTIME
    run "${TPU[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
      --version="$RUNTIME" ${EXTRA[@]+"${EXTRA[@]}"} ;;
  install)
    need NAME ZONE
    no_extra
    if [[ -n $REPO ]]; then
      fetch="if [ -d llmjax/.git ]; then git -C llmjax pull --ff-only"
      fetch+="; else git clone $(quote "$REPO") llmjax; fi"
    else
      tarball="${TMPDIR:-/tmp}/llmjax-$NAME.tgz"
      pack="cd $(quote "$ROOT") && git ls-files -z --cached --others --exclude-standard"
      pack+=" | tar -czf $(quote "$tarball") --null --ignore-failed-read -T -"
      run bash -c "$pack"  # the checkout as it is: tracked and new files, not ignored ones
      run "${TPU[@]}" scp "$tarball" "$NAME:llmjax.tgz" "${WHERE[@]}" --worker=all
      fetch="mkdir -p llmjax && tar -xzf llmjax.tgz -C llmjax"
    fi
    setup="export PATH=\$HOME/.local/bin:\$PATH && cd llmjax"
    setup+=" && { command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    setup+=" && { [ -x .venv/bin/python ] || uv venv --seed --python $PYTHON_VERSION .venv; }"
    setup+=" && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'"
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$fetch && $setup" ;;
  launch)
    need NAME ZONE CONFIG WORKDIR
    if [[ $WORKDIR == gs://* ]]; then
      check_bucket
    else
      refuse_local_workdir_on_a_pod
    fi
    main=$(quote .venv/bin/python -m llmjax.main --config="$CONFIG" --workdir="$WORKDIR" \
      ${EXTRA[@]+"${EXTRA[@]}"})
    keep=$(quote "$main ; echo \$? > ~/$EXIT")  # the run, then its exit status for `status`
    started="echo \"\$(hostname): started, log ~/$LOG\""
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
      --command="cd llmjax && rm -f ~/$EXIT && nohup bash -c $keep > ~/$LOG 2>&1 < /dev/null & $started" ;;
  logs)
    need NAME ZONE
    no_extra
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$WORKER" \
      --command="tail -n 100 -f ~/$LOG" ;;
  status)
    need NAME ZONE
    no_extra
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$(status_script)" ;;
  stop)
    need NAME ZONE
    no_extra
    stop="${RUNNING/pgrep/pkill -TERM} || echo \"\$(hostname): not running\""
    stop+="; i=0; while $RUNNING && [ \$i -lt 600 ]; do sleep 1; i=\$((i + 1)); done"
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$stop; $(status_script)" ;;
  delete)
    need NAME ZONE
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" ${EXTRA[@]+"${EXTRA[@]}"} ;;
  "") echo "tpu.sh: give a command: create, install, launch, logs, status, stop or delete" >&2
      usage 2 ;;
  *) die "unknown command $COMMAND; expected create, install, launch, logs, status, stop or" \
       "delete" ;;
esac
