#!/bin/sh
# Entry point of the compose `worker` service: one Celery encode worker node on one GPU of its own.
#
# Compose gives the replicas of a service no index, and a GPU reservation of `count: 1` hands every
# replica the same device (GPU 0). So each replica sees every GPU of the host and claims the first
# free one with an exclusive lock on /var/lib/hashlake/gpu-claims/gpu-<i> (a volume all replicas
# share). The lock's descriptor stays open in Celery and its pool child, so the claim lasts exactly
# as long as the worker: the kernel releases it when the container stops or dies, and the restarted
# replica claims again. With ENCODE_GPUS = the host's GPU count, every GPU has one worker.
# On a host without GPUs the node runs on the CPU.
set -eu
claims=${GPU_CLAIMS_DIR:-/var/lib/hashlake/gpu-claims}
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
worker() {  # $1: the node name; the rest of the environment is the service's
  exec celery -A workers.celery_app worker --pool prefork --concurrency 1 --loglevel INFO --hostname "$1@%h"
}
if [ "$gpus" = 0 ]; then
  export HASHLAKE_DEVICE=cpu
  worker encode-cpu
fi
i=0
while [ "$i" -lt "$gpus" ]; do
  exec 9>"$claims/gpu-$i"
  if flock --nonblock 9; then
    # Only the claimed GPU is visible to this node: it is cuda:0 inside, and no CUDA context of
    # this process lands on another replica's device.
    export CUDA_VISIBLE_DEVICES="$i" HASHLAKE_DEVICE=cuda:0
    echo "encode worker: claimed GPU $i of $gpus"
    worker "encode-gpu$i"
  fi
  exec 9>&-
  i=$((i + 1))
done
echo "encode worker: all $gpus GPUs are claimed by other replicas; set ENCODE_GPUS to at most $gpus" >&2
exit 1
