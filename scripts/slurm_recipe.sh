#!/usr/bin/env bash
# A SLURM job that trains a recipe and survives pre-emption and its time limit, without
# submitit (`vlmtrain -m cluster=slurm ...` is the submitit way): SLURM sends SIGUSR1 300 s
# before the end (and at a pre-emption), vlmtrain saves a checkpoint at the next optimizer
# step and runs `scontrol requeue`; the requeued job re-runs the same command, which skips
# finished stages and resumes the interrupted one from that checkpoint
# (runs/<run_name>/<stage>/checkpoints/step-*.ckpt). See README.md, "SLURM".
#
#   sbatch scripts/slurm_recipe.sh recipe=llava15 run_name=l15 model.vision.path=... ...
#
#SBATCH --job-name=vlmtrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"
# Lightning reads SLURM's environment (one task per GPU). Not tested on a cluster yet.
srun .venv/bin/vlmtrain trainer=gpu trainer.requeue_signal=SIGUSR1 trainer.devices=8 trainer.num_nodes="${SLURM_NNODES}" "$@"
