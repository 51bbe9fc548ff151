#!/usr/bin/env bash
# Start a real single-node SLURM (slurmctld + slurmd on localhost, munge auth, no accounting database) so that
# `snakemake --profile profiles/slurm` and tests/test_slurm.py run against the real scheduler.
#
#   sudo ci/slurm/start_slurm.sh          # as root (CI runs as root); idempotent, safe to run twice
#
# Debian/Ubuntu packages (slurm-wlm, munge) are installed when missing. Everything works inside containers:
# process tracking by /proc (proctrack/linuxproc) and no task plugin, so no cgroup delegation is needed.
# Environment knobs: SLURM_CONF_DIR (default /etc/slurm), SLURM_STATE_DIR (default /var/spool/slurm),
# SLURM_WAIT_S (default 60), SLURM_MEM_MARGIN_MB (memory kept back from the node, default 1024).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CONF_DIR="${SLURM_CONF_DIR:-/etc/slurm}"
STATE_DIR="${SLURM_STATE_DIR:-/var/spool/slurm}"
LOG_DIR="${SLURM_LOG_DIR:-/var/log/slurm}"
WAIT_S="${SLURM_WAIT_S:-60}"
MEM_MARGIN_MB="${SLURM_MEM_MARGIN_MB:-1024}"

log() { echo "[start_slurm] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages and starts munged, slurmctld and slurmd)"
    exit 1
fi

# ---- 1. packages --------------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
fi
log "$(slurmctld -V)"

# ---- 2. munge -----------------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --force; else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || { log "munged did not come up"; exit 1; }
fi

# ---- 3. configuration -------------------------------------------------------------------------------------
CPUS="$(nproc)"
MEM_TOTAL_MB="$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)"
REAL_MEM_MB=$((MEM_TOTAL_MB - MEM_MARGIN_MB))
[ "$REAL_MEM_MB" -gt 256 ] || REAL_MEM_MB=256

# GPUs: one gres line per /dev/nvidiaN (Debian's build has no NVML autodetection); none on CPU-only hosts
GPU_FILES=()
for dev in /dev/nvidia[0-9]*; do [ -e "$dev" ] && GPU_FILES+=("$dev"); done
GRES_NODE=""
GRES_TYPES=""
mkdir -p "$CONF_DIR"
: >"$CONF_DIR/gres.conf.new"
if [ "${#GPU_FILES[@]}" -gt 0 ]; then
    GPU_MODEL="$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null \
        | tr 'A-Z' 'a-z' | grep -oE 'h100|h200|a100|l40s|l4|a10|v100|t4' | head -1 || true)"
    GPU_MODEL="${GPU_MODEL:-gpu}"
    GRES_TYPES="GresTypes=gpu"
    GRES_NODE="Gres=gpu:${GPU_MODEL}:${#GPU_FILES[@]}"
    for dev in "${GPU_FILES[@]}"; do
        echo "NodeName=localhost Name=gpu Type=${GPU_MODEL} File=${dev}" >>"$CONF_DIR/gres.conf.new"
    done
fi

sed -e "s|@CPUS@|$CPUS|g" -e "s|@REAL_MEM_MB@|$REAL_MEM_MB|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
    -e "s|@LOG_DIR@|$LOG_DIR|g" -e "s|@GRES_TYPES@|$GRES_TYPES|g" -e "s|@GRES_NODE@|$GRES_NODE|g" \
    "$HERE/slurm.conf.in" >"$CONF_DIR/slurm.conf.new"
cp "$HERE/cgroup.conf" "$CONF_DIR/cgroup.conf.new"

changed=0
for f in slurm.conf gres.conf cgroup.conf; do
    if ! cmp -s "$CONF_DIR/$f.new" "$CONF_DIR/$f"; then
        mv "$CONF_DIR/$f.new" "$CONF_DIR/$f"
        changed=1
    else
        rm -f "$CONF_DIR/$f.new"
    fi
done
mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR"

# ---- 4. daemons ---------------------------------------------------------------------------------------------
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if running "$STATE_DIR/slurmctld.pid"; then
    if [ "$changed" = 1 ]; then log "configuration changed: scontrol reconfigure"; scontrol reconfigure || true; fi
else
    log "starting slurmctld"
    slurmctld -i
fi
for _ in $(seq "$WAIT_S"); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 1; done
scontrol ping | grep -q UP || { log "slurmctld not responding; see $LOG_DIR/slurmctld.log"; tail -20 "$LOG_DIR/slurmctld.log" >&2; exit 1; }

if ! running "$STATE_DIR/slurmd.pid"; then
    log "starting slurmd"
    slurmd -N localhost
fi

# ---- 5. wait for the node --------------------------------------------------------------------------------
state=""
for i in $(seq "$WAIT_S"); do
    state="$(sinfo -h -N -n localhost -o %T 2>/dev/null | head -1 | tr -d '*~#')"
    case "$state" in
        idle|mixed|allocated) break ;;
        down|drained|draining|unknown|"")
            # ReturnToService=2 normally brings it back; after a changed config nudge it explicitly
            if [ "$i" -gt 3 ]; then scontrol update NodeName=localhost State=RESUME 2>/dev/null || true; fi ;;
    esac
    sleep 1
done
case "$state" in
    idle|mixed|allocated) ;;
    *) log "node localhost is '$state' after ${WAIT_S}s; see $LOG_DIR/slurmd.log"; tail -20 "$LOG_DIR/slurmd.log" >&2; exit 1 ;;
esac
sinfo
log "SLURM ready (node localhost: $state, ${CPUS} CPUs, ${REAL_MEM_MB} MB${GRES_NODE:+, $GRES_NODE})"
