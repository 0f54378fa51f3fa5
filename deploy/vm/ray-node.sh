#!/usr/bin/env bash
# Start or stop the Ray node of a patchaudit cluster on a plain VM.
#
#   ray-node.sh head [RAY START OPTIONS...]            start the head node
#   ray-node.sh worker HEAD_HOST [RAY START OPTIONS...] join the cluster whose head is HEAD_HOST
#   ray-node.sh stop                                    stop every Ray process on this node
#
# Extra options go to `ray start` unchanged (e.g. --block under systemd, --num-gpus=0).
# Environment:
#   PATCHAUDIT_VENV  virtualenv with patchaudit installed (default /opt/patchaudit/venv)
#   RAY_GCS_PORT     the head's GCS port (default 6380, so that 6379 stays free for Redis)
#   RAY_AUTH_MODE=token, RAY_AUTH_TOKEN: Ray's token authentication; the same token on every node
#                    and for every driver (`patchaudit score`). Required: a node without them would
#                    start a cluster with a token of its own (~/.ray/auth_token) or none.
#   AWS_*, HF_HUB_OFFLINE: read by the Ray actors, which inherit this process's environment;
#                    set them before starting a node (the systemd unit reads
#                    /etc/patchaudit/patchaudit.env). The actors get the Redis URL from the
#                    scheduler, whose REDIS_URL must therefore be reachable from every node.
set -euo pipefail

venv="${PATCHAUDIT_VENV:-/opt/patchaudit/venv}"
gcs_port="${RAY_GCS_PORT:-6380}"
ray="$venv/bin/ray"

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

check_env() {
    if [[ "${RAY_AUTH_MODE:-}" != "token" || -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        echo "ray-node.sh: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (the cluster's token, the same on" \
             "every node and for every driver) in /etc/patchaudit/patchaudit.env" >&2
        exit 1
    fi
    if [[ "${HF_HUB_OFFLINE:-}" != "1" ]]; then
        echo "ray-node.sh: warning: HF_HUB_OFFLINE is not 1; set it so that no node downloads weights" >&2
    fi
    if [[ -z "${AWS_ACCESS_KEY_ID:-}${AWS_PROFILE:-}${AWS_ROLE_ARN:-}" ]]; then
        echo "ray-node.sh: note: no AWS_ACCESS_KEY_ID/AWS_PROFILE/AWS_ROLE_ARN set;" \
             "actors will rely on an instance role for S3" >&2
    fi
}

[[ $# -ge 1 ]] || usage
[[ -x "$ray" ]] || { echo "ray-node.sh: $ray not found; set PATCHAUDIT_VENV" >&2; exit 1; }

role="$1"
shift
case "$role" in
    head)
        check_env
        # The dashboard (and its job-submission API) listens on localhost only: reach it through
        # an SSH tunnel. The Ray Client server (port 10001) serves RAY_ADDRESS=ray://HEAD:10001.
        exec "$ray" start --head --port="$gcs_port" --dashboard-host=127.0.0.1 \
            --ray-client-server-port=10001 "$@"
        ;;
    worker)
        [[ $# -ge 1 ]] || usage
        head_host="$1"
        shift
        check_env
        exec "$ray" start --address="$head_host:$gcs_port" "$@"
        ;;
    stop)
        exec "$ray" stop
        ;;
    *)
        usage
        ;;
esac
