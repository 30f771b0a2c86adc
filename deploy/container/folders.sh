#!/bin/sh
# Owners and modes of dmzbroker's folders inside the containers: the same as deploy/install.sh
# gives them on one host (docs/deployment.md), with the image's fixed user and group ids
# (a container's users are numbers; the names exist only in the image's /etc/passwd).
#
# Run twice in a container's life: when the image is built (the mount points, which Docker and
# Podman copy, owners and modes included, into a named volume the first time it is mounted), and
# by compose.yaml's `init` service (volumes that already hold files, bind mounts, and volume
# drivers that copy nothing). Owners are set on everything a folder holds, modes on the folder
# only: the halves give their files their own modes.
set -eu

PLANT=10001       # dmzbroker-plant, user and group
ENTERPRISE=10002  # dmzbroker-enterprise, user and group (and a member of group 10001)
ROOT=${1:-/var/lib/dmzbroker}  # another root only for tests

# folder OWNER:GROUP MODE [--recursive]
folder() {
    mkdir -p "$1"
    if [ "${4:-}" = --recursive ]; then chown -R "$2" "$1"; else chown "$2" "$1"; fi
    chmod "$3" "$1"
}

folder "$ROOT" 0:0 0755
folder "$ROOT/spool" "$PLANT:$PLANT" 0750 --recursive       # the enterprise reads it by group
folder "$ROOT/plant" "$PLANT:$PLANT" 0700 --recursive       # island flag, accepted policy
folder "$ROOT/enterprise" "$ENTERPRISE:$ENTERPRISE" 0700 --recursive
folder "$ROOT/audit" "0:$PLANT" 0750
folder "$ROOT/audit/plant" "$PLANT:$PLANT" 0750 --recursive  # the enterprise exports it to the SIEM
folder "$ROOT/audit/cli" "$PLANT:$PLANT" 0750 --recursive    # `island`, `audit` run in the plant container
folder "$ROOT/audit/enterprise" "$ENTERPRISE:$ENTERPRISE" 0700 --recursive
