#!/usr/bin/env bash
# docker-up.sh: make sure the Docker engine runs, for the Docker tests:
# start it if it is installed and stopped. Without Docker the tests that
# need it skip, or fail with CI=true.
set -uo pipefail
docker info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null; then
  echo "docker-up.sh: the Docker engine is not installed (docker.io); the Docker tests cannot run" >&2
  exit 0
fi
echo "docker-up.sh: starting the Docker engine"
if ! { service docker start || systemctl start docker; } >/dev/null 2>&1; then
  nohup dockerd >/var/log/dockerd.log 2>&1 &
fi
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "docker-up.sh: the Docker engine did not come up within 30 s" >&2
exit 0
