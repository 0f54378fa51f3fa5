#!/usr/bin/env bash
# Make sure a Redis answers PING on 127.0.0.1:$REDIS_PORT (default 6379); start one if none does.
# The one started here is a throwaway: loopback only, no persistence, left running for later runs.
# Without redis-server: installed with apt-get when running as root, else a clear error.
set -euo pipefail

port="${REDIS_PORT:-6379}"

# Prints Redis's reply to PING (empty when nothing listens); uses bash's /dev/tcp, so no redis-cli needed.
ping_reply() {
    local reply=""
    if exec 3<>"/dev/tcp/127.0.0.1/${port}"; then
        printf 'PING\r\n' >&3
        IFS= read -r -t 2 reply <&3 || true
        exec 3>&- 3<&-
    fi
    printf '%s' "${reply%$'\r'}"
}

reply="$(ping_reply 2>/dev/null)"
if [[ "$reply" == "+PONG" ]]; then
    echo "redis: answering on 127.0.0.1:${port}"
    exit 0
fi
if [[ -n "$reply" ]]; then
    echo "ensure-redis: something on 127.0.0.1:${port} answered PING with '${reply}', not +PONG;" \
         "free the port or set REDIS_PORT" >&2
    exit 1
fi

if ! command -v redis-server >/dev/null 2>&1; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        echo "ensure-redis: redis-server not found; installing it with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq redis-server >/dev/null
    else
        echo "ensure-redis: no Redis answers on 127.0.0.1:${port} and redis-server is not installed;" \
             "install it (e.g. 'sudo apt-get install redis-server') or start a Redis there" >&2
        exit 1
    fi
fi

redis-server --daemonize yes --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null
for _ in $(seq 50); do
    if [[ "$(ping_reply 2>/dev/null)" == "+PONG" ]]; then
        echo "redis: started on 127.0.0.1:${port}"
        exit 0
    fi
    sleep 0.2
done
echo "ensure-redis: started redis-server on 127.0.0.1:${port} but it does not answer PING after 10 s" >&2
exit 1
