#!/bin/bash
# Multi-node training on SLURM: one torchrun per node, each starting one worker per GPU; the
# workers of all nodes meet through torchrun's c10d rendezvous on the allocation's first node.
# Submit from the repository root; every argument is a train.py override (KEY=VALUE):
#
#   sbatch scripts/slurm_train.sh model=gpt2 data=shakespeare out_dir=/shared/runs/gpt2 train.batch_size=512
#   sbatch --nodes=4 scripts/slurm_train.sh ...        # more nodes: nothing else changes
#   sbatch scripts/slurm_train.sh ... resume=true      # continue after a time limit or a preemption
#
# out_dir and data.cache_dir must be on a filesystem that every node sees: rank 0 writes the
# checkpoints and metrics, and every rank reads ckpt.pt on resume. Knobs (environment variables):
# NPROC_PER_NODE (default: the GPUs SLURM gave each node), PYTHON (default: python),
# RDZV_PORT (default: 29500). Edit the #SBATCH lines for your cluster (partition, account, ...).
#
# A failing rank ends the whole job: torchrun stops the other workers of its node, the other nodes'
# torchruns see the rendezvous close, and srun --kill-on-bad-exit ends every task. Five minutes
# before the time limit SLURM sends SIGTERM: the workers finish their step, write ckpt.pt and exit.
#SBATCH --job-name=gpt-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$PWD}"

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # (no `| head`: pipefail)
head_node=${nodes[0]}
nproc_per_node=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes x $nproc_per_node processes, rendezvous at $head_node"

srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$nproc_per_node" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_node:${RDZV_PORT:-29500}" \
    train.py "$@"
