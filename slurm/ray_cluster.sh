# shellcheck shell=bash
# A Ray cluster inside a Slurm allocation, one galaxysae job run against it, then a clean stop.
#
# Sourced by the slurm/*.sbatch scripts, which call `galaxysae_slurm_main JOB [--key value ...]`:
#   1. a Ray head on the first node and one Ray worker on every other node, each an `srun` step
#      (so Slurm tracks and reaps them), bound to the node's own address, with ports derived
#      from the job id (probed free on the head) so jobs sharing a node never collide, a short
#      per-job --temp-dir, and the CPUs, GPUs and memory Slurm allocated (--mem / --mem-per-cpu:
#      the object store gets 30% of it; Ray would otherwise size itself to the node's whole RAM);
#   2. token authentication with a random per-job token (exported to the steps, never printed);
#   3. `galaxysae JOB ...` with RAY_ADDRESS pointing at the head;
#   4. Ray stopped on exit, and on SIGTERM (`#SBATCH --signal=B:TERM@120`: time limit or
#      preemption), after which the job is requeued: outputs are resumable, so a requeued job
#      skips what is already done.
#
# Settings (environment, all optional):
#   GALAXYSAE_HOME     the checkout to run from (default: the sbatch submit dir)
#   GALAXYSAE_PYTHON   python with galaxysae and ray installed (default: $GALAXYSAE_HOME/.venv
#                      if present, else python3 on PATH)
#   CONTAINER_IMAGE    run Ray and the job inside this image (Apptainer .sif/docker:// URI, or a
#                      Pyxis/enroot image); CONTAINER_RUNTIME=apptainer (default) or pyxis
#   CONTAINER_MOUNTS   extra bind mounts, comma separated (src:dst), e.g. a data dir
#   RAY_NODE_IP        the head's address (default: the first node's resolved IPv4 address)
#   RAY_PORT_BASE      first port of this job's block (default: derived from SLURM_JOB_ID)
#   GALAXYSAE_REQUEUE_ON_TERM  1 (default): requeue the job after SIGTERM; 0: just stop
#   GALAXYSAE_MAX_REQUEUES     requeue at most this many times (default 10): a unit of work
#                      (a shard, an epoch) longer than the time limit would otherwise loop for ever
#   RAY_START_TIMEOUT  seconds to wait for every node to join (default 300)
#   RAY_STOP_GRACE     seconds each part (driver, workers, head) gets to exit after SIGTERM
#                      before SIGKILL (default 10; outputs are whole files by then, so nothing
#                      is lost): a cancelled or requeued job ends within about 30 s

_gs_log() { printf '[galaxysae-slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

_gs_setup() {
  GALAXYSAE_HOME=${GALAXYSAE_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
  CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
  CONTAINER_RUNTIME=${CONTAINER_RUNTIME:-apptainer}
  CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
  # Steps inherit SLURM_EXPORT_ENV from sbatch: after `--export=NONE` (or SBATCH_EXPORT=NONE, a
  # site default in places) they would not see RAY_ADDRESS or the token set below.
  export SLURM_EXPORT_ENV=ALL
  _GS_STEP=(srun --overlap --ntasks-per-node=1 --kill-on-bad-exit=0)
  _GS_EXEC=()
  if [[ -n $CONTAINER_IMAGE ]]; then
    local mounts=$GALAXYSAE_HOME:$GALAXYSAE_HOME
    [[ -n $CONTAINER_MOUNTS ]] && mounts+=",$CONTAINER_MOUNTS"
    case $CONTAINER_RUNTIME in
      apptainer | singularity)
        _GS_EXEC=("$CONTAINER_RUNTIME" exec --bind "$mounts" --pwd "$PWD")
        [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]] && _GS_EXEC+=(--nv)
        _GS_EXEC+=("$CONTAINER_IMAGE")
        ;;
      pyxis)
        # Each step is its own container: the host's /tmp gives them one Ray temp dir (sockets).
        _GS_STEP+=(--container-image="$CONTAINER_IMAGE" --container-mounts="/tmp:/tmp,$mounts"
          --container-workdir="$PWD")
        ;;
      *)
        _gs_log "CONTAINER_RUNTIME=$CONTAINER_RUNTIME is not one of apptainer, singularity, pyxis"
        return 2
        ;;
    esac
    # Inside the image (see Dockerfile) python, ray and galaxysae are on PATH.
    _GS_PY=${GALAXYSAE_PYTHON:-python}
    _GS_RAY=ray
  else
    if [[ -n ${GALAXYSAE_PYTHON:-} ]]; then
      _GS_PY=$GALAXYSAE_PYTHON
    elif [[ -x $GALAXYSAE_HOME/.venv/bin/python ]]; then
      _GS_PY=$GALAXYSAE_HOME/.venv/bin/python
    else
      _GS_PY=python3
    fi
    local bindir
    bindir=$(dirname "$(command -v "$_GS_PY")")
    if [[ -x $bindir/ray ]]; then _GS_RAY=$bindir/ray; else _GS_RAY=ray; fi
    export PYTHONPATH=$GALAXYSAE_HOME${PYTHONPATH:+:$PYTHONPATH}
  fi
  mapfile -t _GS_NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  _GS_HEAD=${_GS_NODES[0]}
  _GS_NNODES=${#_GS_NODES[@]}
  _GS_CPUS=${SLURM_CPUS_ON_NODE:-1}
  _GS_GPUS=${SLURM_GPUS_ON_NODE:-0}
  # Each step gets every CPU of its node (steps overlap): srun 22.05-23.02 does not inherit
  # --cpus-per-task from sbatch, so a step would get one CPU, and with task/cgroup or
  # task/affinity a whole Ray node (raylet and every worker) would run on that one core.
  _GS_STEP+=(--cpus-per-task="$_GS_CPUS")
  # The job's memory per node in MB (empty: Slurm said nothing, Ray sizes itself to the node).
  _GS_MEM_MB=${SLURM_MEM_PER_NODE:-}
  if [[ -z $_GS_MEM_MB && ${SLURM_MEM_PER_CPU:-} =~ ^[0-9]+$ ]]; then
    _GS_MEM_MB=$((SLURM_MEM_PER_CPU * _GS_CPUS))
  fi
  [[ $_GS_MEM_MB =~ ^[1-9][0-9]*$ ]] || _GS_MEM_MB=  # --mem=0 (the whole node): Ray's own sizing
  # Short: Ray's unix socket paths must fit in 107 characters.
  _GS_TMP=/tmp/ray-${SLURM_JOB_ID}
}

_gs_worker_cpus() {
  # SLURM_JOB_CPUS_PER_NODE lists the job's CPUs per node in node-list order ("16(x2),8"). With
  # whole nodes of mixed sizes a worker node may have fewer than the batch node, and a step asking
  # any node for more than it holds is refused: the workers' step asks for the fewest they hold.
  local item n count min='' i=0 items=()
  IFS=, read -ra items <<<"${SLURM_JOB_CPUS_PER_NODE:-}"
  for item in "${items[@]}"; do
    if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      n=${BASH_REMATCH[1]} count=${BASH_REMATCH[2]}
    elif [[ $item =~ ^[0-9]+$ ]]; then
      n=$item count=1
    else
      break
    fi
    # the first node is the head's (the batch node)
    if ((i + count > 1)) && [[ -z $min || $n -lt $min ]]; then min=$n; fi
    i=$((i + count))
  done
  echo "${min:-$_GS_CPUS}"
}

_gs_port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_gs_pick_ports() {
  # 55 blocks of 400 ports in 10000-31999: below Linux's ephemeral range (32768+), where
  # outgoing connections would otherwise steal our listening ports.
  local slot=$((SLURM_JOB_ID % 55)) tries=0 p busy
  if [[ -n ${RAY_PORT_BASE:-} ]]; then
    _GS_BASE=$RAY_PORT_BASE
    return
  fi
  while ((tries < 55)); do
    _GS_BASE=$((10000 + ((slot + tries) % 55) * 400))
    busy=0
    for p in 0 1 2 3 4 5 6 7 8; do
      if _gs_port_busy "$_GS_IP" $((_GS_BASE + p)) || _gs_port_busy 127.0.0.1 $((_GS_BASE + p)); then
        busy=1
        break
      fi
    done
    ((busy == 0)) && return
    tries=$((tries + 1))
  done
  _gs_log "no free port block in 10000-31999 on $_GS_HEAD"
  return 1
}

_gs_ray_ports() {
  # The same offsets on every node; worker processes take ports from the block's tail.
  local b=$_GS_BASE
  printf '%s\n' --object-manager-port=$((b + 3)) --node-manager-port=$((b + 4)) \
    --dashboard-agent-listen-port=$((b + 5)) --dashboard-agent-grpc-port=$((b + 6)) \
    --runtime-env-agent-port=$((b + 7)) --metrics-export-port=$((b + 8)) \
    --min-worker-port=$((b + 10)) --max-worker-port=$((b + 399))
}

_gs_ray_memory() {
  # Ray reads the memory limit from the root cgroup only, so inside a Slurm job it sees the whole
  # node and gives its object store 30% of that: a streaming job could then fill far more shared
  # memory than the job was granted, and be killed for it. Size both to the job instead.
  [[ -n $_GS_MEM_MB ]] || return 0
  local total=$((_GS_MEM_MB * 1024 * 1024)) store
  store=$((total * 3 / 10))
  printf '%s\n' --object-store-memory=$store --memory=$((total - store))
}

ray_cluster_start() {
  _gs_setup || return
  # The node's own address, never 0.0.0.0; a name that resolves to loopback (a laptop-style
  # /etc/hosts) would strand the other nodes, so then take the first interface address.
  _GS_IP=${RAY_NODE_IP:-$(getent ahostsv4 "$_GS_HEAD" | awk 'NR == 1 { print $1 }')}
  if [[ -z $_GS_IP || $_GS_IP == 127.* ]]; then _GS_IP=$(hostname -I | awk '{ print $1 }'); fi
  _gs_pick_ports || return
  export RAY_ADDRESS=$_GS_IP:$_GS_BASE
  export RAY_AUTH_MODE=token
  # Per-job secret: exported so that srun hands it to every step, never echoed. Prefixed, so that
  # a leak is found by grep and never confused with Ray's hex task or node ids in a log.
  RAY_AUTH_TOKEN=gsray-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  export RAY_AUTH_TOKEN
  export RAY_DISABLE_USAGE_STATS=1
  # On SIGTERM `ray start --block` first drains its node for Ray Serve, for up to 30 s; after
  # Ray Data it never finishes (a detached actor stays), so the stop below would always end in
  # SIGKILL. A batch job's driver has ended by then: stop at once, cleanly.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
  local ports memory
  mapfile -t ports < <(_gs_ray_ports)
  mapfile -t memory < <(_gs_ray_memory)
  _gs_log "job $SLURM_JOB_ID: Ray head on $_GS_HEAD ($RAY_ADDRESS), $_GS_NNODES node(s)," \
    "$_GS_CPUS CPUs and $_GS_GPUS GPUs per node, memory per node:" \
    "${_GS_MEM_MB:+$_GS_MEM_MB MB}${_GS_MEM_MB:-as Ray finds it (no --mem given)}, temp dir $_GS_TMP"
  # The head runs on this (the batch) node: its pid file lets the stop reach it alone.
  rm -f "$_GS_TMP.head.pid"
  # shellcheck disable=SC2016  # $$ and $1 belong to the inner shell
  "${_GS_STEP[@]}" --job-name=gs-ray-head --nodes=1 --ntasks=1 -w "$_GS_HEAD" "${_GS_EXEC[@]}" \
    bash -c 'echo $$ >"$1"; shift; exec "$@"' pidfile "$_GS_TMP.head.pid" \
    "$_GS_RAY" start --head --block --node-ip-address="$_GS_IP" --port="$_GS_BASE" \
    --dashboard-host=127.0.0.1 --dashboard-port=$((_GS_BASE + 1)) \
    --ray-client-server-port=$((_GS_BASE + 2)) "${ports[@]}" "${memory[@]}" \
    --num-cpus="$_GS_CPUS" --num-gpus="$_GS_GPUS" --temp-dir="$_GS_TMP" \
    --disable-usage-stats &
  _GS_HEAD_PID=$!
  if ((_GS_NNODES > 1)); then
    local wcpus wmem=$_GS_MEM_MB wmemory
    wcpus=$(_gs_worker_cpus)
    ((wcpus == _GS_CPUS)) || _gs_log "worker nodes hold $wcpus CPUs for this job (the head's: $_GS_CPUS): each runs a Ray node of $wcpus"
    if [[ -z ${SLURM_MEM_PER_NODE:-} && ${SLURM_MEM_PER_CPU:-} =~ ^[1-9][0-9]*$ ]]; then
      wmem=$((SLURM_MEM_PER_CPU * wcpus))
    fi
    mapfile -t wmemory < <(_GS_MEM_MB=$wmem _gs_ray_memory)
    "${_GS_STEP[@]}" --cpus-per-task="$wcpus" --job-name=gs-ray-workers --nodes=$((_GS_NNODES - 1)) \
      --ntasks=$((_GS_NNODES - 1)) --exclude="$_GS_HEAD" "${_GS_EXEC[@]}" \
      "$_GS_RAY" start --block --address="$RAY_ADDRESS" "${ports[@]}" "${wmemory[@]}" \
      --num-cpus="$wcpus" --num-gpus="$_GS_GPUS" --temp-dir="$_GS_TMP" &
    _GS_WORKERS_PID=$!
  fi
  _gs_wait_nodes
}

_gs_wait_nodes() {
  local timeout=${RAY_START_TIMEOUT:-300}
  # ray.init retries until the head answers; then count the nodes that have joined.
  "${_GS_STEP[@]}" --job-name=gs-ray-wait --nodes=1 --ntasks=1 -w "$_GS_HEAD" "${_GS_EXEC[@]}" "$_GS_PY" -c "
import os, sys, time
import ray
want, deadline = $_GS_NNODES, time.time() + $timeout
while True:
    try:
        ray.init(address='$RAY_ADDRESS', logging_level='ERROR', log_to_driver=False)
        break
    except Exception as exc:  # the head is still starting
        if time.time() > deadline:
            sys.exit(f'Ray head at $RAY_ADDRESS not reachable after ${timeout}s: {exc}')
        time.sleep(2)
while True:
    alive = sum(1 for n in ray.nodes() if n['Alive'])
    if alive >= want:
        cpus = os.environ.get('SLURM_CPUS_PER_TASK', '1 (srun default)')
        print(f'Ray cluster ready: {alive} node(s), resources {ray.cluster_resources()};'
              f' CPUs per step: {cpus}', file=sys.stderr)
        break
    if time.time() > deadline:
        sys.exit(f'only {alive} of {want} Ray nodes joined within ${timeout}s')
    time.sleep(2)
"
}

_gs_stop_step() {
  # SIGTERM, then SIGKILL after a grace period. `ray start --block` answers SIGTERM by stopping
  # its daemons (no drain: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S), but only while the GCS is up:
  # the head's GCS lives in the head step, so the head gets SIGTERM on its `ray start` process
  # alone (pid file), the other steps through Slurm (srun itself would answer SIGTERM with SIGKILL).
  local pid=$1 name=$2 pidfile=${3:-} i step
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  if [[ -n $pidfile && -s $pidfile ]]; then
    kill -TERM "$(<"$pidfile")" 2>/dev/null || true
  else
    # `|| true`: under `set -e` a slow controller must not end the stop half-way
    step=$(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>/dev/null | awk -v n="$name" '$2 == n { print $1 }') || true
    if [[ -n $step ]]; then
      # shellcheck disable=SC2086  # one step id per word
      scancel --signal=TERM $step 2>/dev/null || true
    else
      kill -TERM "$pid" 2>/dev/null || true
    fi
  fi
  # Bounded: Ray's shutdown can hang (a GCS already gone, a raylet draining); SIGKILL after
  # the grace period, to the step's `ray start` process too (srun's own pid alone would leave it).
  for ((i = 0; i < 2 * ${RAY_STOP_GRACE:-10}; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    _gs_log "$name did not stop within ${RAY_STOP_GRACE:-10}s: SIGKILL"
    if [[ -n $pidfile && -s $pidfile ]]; then kill -KILL "$(<"$pidfile")" 2>/dev/null || true; fi
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

ray_cluster_stop() {
  local i
  [[ -n ${_GS_STOPPED:-} ]] && return 0
  _GS_STOPPED=1
  _gs_log "stopping Ray"
  _gs_stop_step "${_GS_DRIVER_PID:-}" gs-driver
  _gs_stop_step "${_GS_WORKERS_PID:-}" gs-ray-workers
  _gs_stop_step "${_GS_HEAD_PID:-}" gs-ray-head "$_GS_TMP.head.pid"
  rm -f "$_GS_TMP.head.pid"
  # Keep Ray's logs when something went wrong; they are per job, so nothing else is touched.
  if [[ ${_GS_RC:-1} -eq 0 && -n ${_GS_TMP:-} ]]; then
    # a head stopped by SIGKILL leaves its daemons to Slurm, which ends them a moment later:
    # until then they may still write logs here
    for ((i = 0; i < 10; i++)); do
      rm -rf "$_GS_TMP" 2>/dev/null && [[ ! -e $_GS_TMP ]] && break
      sleep 1
    done
    if ((${_GS_NNODES:-1} > 1)); then  # and on the worker nodes
      "${_GS_STEP[@]}" --job-name=gs-ray-clean --nodes=$((_GS_NNODES - 1)) --ntasks=$((_GS_NNODES - 1)) \
        --exclude="$_GS_HEAD" rm -rf "$_GS_TMP" || true
    fi
  fi
}

_gs_on_term() {
  trap '' TERM INT
  # Read the state first: scancel marks the job CANCELLED before it signals us, while the
  # time-limit warning (--signal=B:TERM@120) and preemption leave it RUNNING. Slurm also lets
  # a finished job be requeued, so a cancelled job must be told apart here, not by requeue failing.
  # (`|| true`: under `set -e` a controller that times out would end this handler before the stop)
  local state restarts=${SLURM_RESTART_COUNT:-0} max=${GALAXYSAE_MAX_REQUEUES:-10}
  state=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2) || true
  _gs_log "SIGTERM (job state ${state:-unknown}): stopping the job and Ray (outputs written so far are kept)"
  _GS_RC=143
  ray_cluster_stop
  if [[ ${GALAXYSAE_REQUEUE_ON_TERM:-1} == 1 && $state == RUNNING ]]; then
    if ((restarts >= max)); then
      _gs_log "job $SLURM_JOB_ID not requeued: $restarts requeue(s) already" \
        "(GALAXYSAE_MAX_REQUEUES=$max); is one unit of work longer than the time limit?" \
        "Resubmit with a longer TIME: finished outputs are kept"
    elif scontrol requeue "$SLURM_JOB_ID" 2>/dev/null; then
      _gs_log "job $SLURM_JOB_ID requeued: the rerun skips what is already done"
    fi
  fi
  exit 143
}

galaxysae_slurm_main() {
  local job=$1
  shift
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "galaxysae: this script runs inside a Slurm job: sbatch slurm/$job.sbatch --config FILE.toml" >&2
    return 2
  fi
  _gs_setup || return
  if [[ -n $CONTAINER_IMAGE ]]; then
    ray_cluster_run galaxysae "$job" "$@"
  else
    ray_cluster_run "$_GS_PY" -m galaxysae "$job" "$@"
  fi
}

ray_cluster_run() {
  # Start Ray across the allocation, run one command on the head node against it, stop Ray.
  trap _gs_on_term TERM INT
  trap ray_cluster_stop EXIT
  ray_cluster_start || { _GS_RC=1; _gs_log "Ray did not start"; return 1; }
  _gs_log "running: $*"
  "${_GS_STEP[@]}" --job-name=gs-driver --nodes=1 --ntasks=1 -w "$_GS_HEAD" "${_GS_EXEC[@]}" "$@" &
  _GS_DRIVER_PID=$!
  _GS_RC=0
  wait "$_GS_DRIVER_PID" || _GS_RC=$?
  _GS_DRIVER_PID=
  _gs_log "finished with exit code $_GS_RC"
  ray_cluster_stop
  return "$_GS_RC"
}
