#!/bin/sh
# Roles of the one image. The same commands run the CI topology without docker (tests/test_cluster.py).
set -eu
case "${1:-api}" in
  ray-head)
    # The head schedules but runs no jobs: --num-cpus=0.
    exec ray start --head --port=6379 --node-ip-address="$(hostname -i | cut -d' ' -f1)" --num-cpus=0 --include-dashboard=false --block
    ;;
  worker)
    # GPUs: Ray counts the ones this container sees (none in a CPU worker); WORKER_GPUS overrides it.
    exec ray start --address="${RAY_HEAD:-ray-head:6379}" --num-cpus="${WORKER_CPUS:-2}" ${WORKER_GPUS:+--num-gpus="$WORKER_GPUS"} --block
    ;;
  api)
    # A Ray driver needs a raylet on its own machine: join the cluster with zero CPUs, then serve.
    ray start --address="${RAY_HEAD:-ray-head:6379}" --num-cpus=0
    prunepilot db upgrade
    exec prunepilot serve --host 0.0.0.0 --port 8000 --no-migrate
    ;;
  *)
    exec "$@"
    ;;
esac
