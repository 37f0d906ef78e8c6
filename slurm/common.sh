# Sourced by every sbatch script: environment, rendezvous, NCCL/InfiniBand defaults, log and TensorBoard dirs.
# Nothing here is specific to one cluster: partition/account come from sbatch's own env (SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_GPUS_PER_NODE) or the command line; every NCCL_* default can be overridden by exporting it.
set -euo pipefail

R1V3_HOME="${R1V3_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$R1V3_HOME"
if [ -n "${R1V3_VENV:-}" ]; then source "$R1V3_VENV/bin/activate"; elif [ -d .venv ]; then source .venv/bin/activate; fi

# Rendezvous: rank 0 lives on the first node of the allocation (init_parallel reads the same variables).
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

# NCCL over InfiniBand on H100 nodes (defaults; export to override). NCCL_IB_HCA / NCCL_SOCKET_IFNAME are left to
# NCCL's autodetection unless set by the site.
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# One run directory per job (stable across requeues: the job id does not change), logs and TensorBoard inside.
export R1V3_RUN_DIR="${R1V3_RUN_DIR:-runs/${SLURM_JOB_NAME:-r1v3}-${SLURM_JOB_ID}}"
mkdir -p "$R1V3_RUN_DIR"
echo "[slurm] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $SLURM_NTASKS tasks," \
     "master $MASTER_ADDR:$MASTER_PORT, run dir $R1V3_RUN_DIR"

# Run one `r1v3` command with one srun task per GPU (or per CPU slot on CPU nodes); requeue when preempted.
r1v3_srun() {
  srun --kill-on-bad-exit=1 r1v3 "$@"
  if [ -f "$R1V3_RUN_DIR/PREEMPTED" ]; then
    echo "[slurm] preempted at step $(cat "$R1V3_RUN_DIR/PREEMPTED"): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}
