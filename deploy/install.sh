#!/usr/bin/env bash
# deploy/install.sh — the users, folders, owners and modes, and units of a dmzbroker appliance
# (docs/deployment.md, ADR 0018). What a package's postinst runs; safe to run again: a second
# run changes nothing, and a run after provisioning applies the owners and modes of the secret
# files that exist by then. It never deletes anything, never follows a symbolic link it is
# asked to own, and never starts or enables a unit.
set -euo pipefail
umask 022

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
PLANT=dmzbroker-plant
ENTERPRISE=dmzbroker-enterprise
DIODE=dmzbroker-diode
STATE=/var/lib/dmzbroker
ETC=/etc/dmzbroker
SHIPPED_PREFIX=/opt/dmzbroker

usage() {
    cat <<EOF
Usage: install.sh [--root DIR] [--prefix DIR] [--role ROLE]

Creates the system users and groups of the role, the folders under $STATE with their
owners and modes, installs the role's systemd units and, if absent, the example
$ETC/broker.yaml; applies owners and modes to the secret files that exist. Idempotent:
run it again after provisioning keys and certificates.

  --root DIR     install into DIR instead of / (tests, image builds); the users are still
                 created on this system, as a package would
  --prefix DIR   where bin/dmzbroker is installed (default $SHIPPED_PREFIX); the units start it
  --role ROLE    all-in-one (default): plant and enterprise halves on this host;
                 ot-host: plant half and diode sender; it-host: diode receiver and enterprise half
  -h, --help     this text
EOF
}

die() {
    echo "install.sh: error: $*" >&2
    exit 2
}
say() { echo "install.sh: $*"; }

ROOT=/
PREFIX=$SHIPPED_PREFIX
ROLE=all-in-one
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --root | --prefix | --role)
            [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
            case $1 in
                --root) ROOT=$2 ;;
                --prefix) PREFIX=$2 ;;
                --role) ROLE=$2 ;;
            esac
            shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --role=*) ROLE=${1#*=}; shift ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

case $ROLE in
    all-in-one) UNITS=(dmzbroker-plant dmzbroker-enterprise); USERS=("$PLANT" "$ENTERPRISE") ;;
    ot-host) UNITS=(dmzbroker-plant dmzbroker-diode-send); USERS=("$PLANT" "$DIODE") ;;
    it-host) UNITS=(dmzbroker-diode-receive dmzbroker-enterprise); USERS=("$PLANT" "$ENTERPRISE") ;;
    *) die "unknown role '$ROLE': use all-in-one, ot-host or it-host" ;;
esac
[[ $(id -u) -eq 0 ]] || die "must run as root: it creates system users and sets owners"
[[ $PREFIX == /* ]] || die "--prefix must be an absolute path, not '$PREFIX'"
[[ -d $ROOT ]] || die "--root $ROOT: no such folder"
[[ $PREFIX != *[#\&\\]* ]] || die "--prefix must not contain '#', '&' or '\\'"
# Everything the run needs is checked before anything is changed.
for unit in "${UNITS[@]}"; do
    [[ -f $HERE/systemd/$unit.service ]] ||
        die "role $ROLE needs $HERE/systemd/$unit.service, which this copy of dmzbroker does not have"
done
[[ -f $HERE/broker.yaml ]] || die "$HERE/broker.yaml (the example configuration) is missing"
[[ -f $HERE/sysctl/90-dmzbroker.conf ]] || die "$HERE/sysctl/90-dmzbroker.conf is missing"
for tool in getent groupadd useradd usermod stat; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed (needed to create the users)"
done
R=$(cd -- "$ROOT" && pwd)
R=${R%/}  # "" for /: every path below is "$R/absolute/path"

has_user() {
    local user
    for user in "${USERS[@]}"; do [[ $user == "$1" ]] && return 0; done
    return 1
}

ensure_user() {  # a system user with a group of its own name, no home, no shell
    local name=$1 comment=$2
    if ! getent group "$name" >/dev/null; then
        groupadd --system "$name"
        say "created group $name"
    fi
    if ! getent passwd "$name" >/dev/null; then
        useradd --system --no-create-home --shell /usr/sbin/nologin --home-dir /nonexistent \
            --gid "$name" --comment "$comment" "$name"
        say "created user $name"
    fi
}

ensure_member() {  # user $1 in the supplementary group $2
    if ! id -nG "$1" | tr ' ' '\n' | grep -qx -- "$2"; then
        usermod --append --groups "$2" "$1"
        say "added $1 to group $2"
    fi
}

ensure_owned() {  # path $1 (under the root) has owner:group $2 and mode $3, else set them
    local path=$R$1 want="$2 ${3#0}" have
    [[ ! -L $path ]] || die "$path is a symbolic link; refusing to set the owner of its target"
    have=$(stat -c '%U:%G %a' -- "$path")
    if [[ $have != "$want" ]]; then
        chown -- "$2" "$path"
        chmod -- "$3" "$path"
        say "$1: $2 $3 (was $have)"
    fi
}

ensure_dir() {  # folder $1 (under the root) with owner:group $2 and mode $3
    local path=$R$1
    if [[ ! -e $path && ! -L $path ]]; then
        mkdir -p -- "$(dirname -- "$path")"
        mkdir -m "$3" -- "$path"
        chown -- "$2" "$path"
        say "created $1 ($2 $3)"
    fi
    [[ -L $path || -d $path ]] || die "$path exists and is not a folder"
    ensure_owned "$1" "$2" "$3"
}

ensure_secret() {  # a secret file $1 (under the root), if it exists: owner:group $2, mode $3
    if [[ -e $R$1 || -L $R$1 ]]; then
        [[ -L $R$1 || -f $R$1 ]] || die "$R$1 is not a regular file"
        ensure_owned "$1" "$2" "$3"
    fi
}

WORK=$(mktemp -d)
trap 'rm -rf -- "$WORK"' EXIT

install_file() {  # content on stdin → $1 (under the root), root:root mode $2, if it differs
    local path=$R$1 tmp
    cat >"$WORK/content"
    if ! [[ -f $path && ! -L $path ]] || ! cmp -s -- "$WORK/content" "$path"; then
        # Written beside it, then renamed: a unit is never seen half written.
        tmp=$(mktemp -- "$path.XXXXXX")
        cat -- "$WORK/content" >"$tmp"
        chmod -- "$2" "$tmp"
        mv -f -- "$tmp" "$path"
        say "installed $1"
    fi
    ensure_owned "$1" root:root "$2"
}

say "role $ROLE, root ${R:-/}, prefix $PREFIX"

# Users: each process its own, and the spool's group for those that read the spool.
ensure_user "$PLANT" "dmzbroker plant half (OT side, writes the spool)"  # every role has it
if has_user "$ENTERPRISE"; then
    ensure_user "$ENTERPRISE" "dmzbroker enterprise half (IT side, reads the spool)"
    ensure_member "$ENTERPRISE" "$PLANT"  # reads the spool and the plant's audit log
fi
if has_user "$DIODE"; then
    ensure_user "$DIODE" "dmzbroker diode sender (OT host, reads the spool)"
    ensure_member "$DIODE" "$PLANT"  # reads the spool
fi

# Folders (broker/deployment/layout.py names who writes which). Nothing of the plant's that
# the enterprise must not read is group-readable: the plant group is the spool readers' group.
ensure_dir $STATE root:root 0755
ensure_dir $STATE/audit "root:$PLANT" 0750
case $ROLE in
    all-in-one | ot-host)
        ensure_dir $STATE/spool "$PLANT:$PLANT" 0750
        ensure_dir $STATE/plant "$PLANT:$PLANT" 0700
        ensure_dir $STATE/audit/plant "$PLANT:$PLANT" 0750 ;;
    it-host)  # the diode receiver writes the spool here, as the plant user
        ensure_dir $STATE/spool "$PLANT:$PLANT" 0750
        ensure_dir $STATE/diode "$PLANT:$PLANT" 0700
        ensure_dir $STATE/audit/diode-receive "$PLANT:$PLANT" 0750 ;;
esac
case $ROLE in
    all-in-one)
        ensure_dir $STATE/audit/supervisor "root:$PLANT" 0750 ;;
    ot-host)
        ensure_dir $STATE/diode "$DIODE:$DIODE" 0700
        ensure_dir $STATE/audit/diode-send "$DIODE:$DIODE" 0700 ;;
esac
if has_user "$ENTERPRISE"; then
    ensure_dir $STATE/enterprise "$ENTERPRISE:$ENTERPRISE" 0700
    ensure_dir $STATE/audit/enterprise "$ENTERPRISE:$ENTERPRISE" 0700
fi
ensure_dir $ETC root:root 0755
ensure_dir $ETC/tls root:root 0755
[[ $ROLE == it-host ]] || ensure_dir $ETC/opcua root:root 0755

# Units, pointed at the prefix.
mkdir -p -- "$R/etc/systemd/system"
for unit in "${UNITS[@]}"; do
    sed "s#$SHIPPED_PREFIX/#$PREFIX/#g" "$HERE/systemd/$unit.service" |
        install_file "/etc/systemd/system/$unit.service" 0644
done

# The kernel settings that go with the firewall (deploy/nftables/README.md): no forwarding,
# no redirects, strict reverse path. Applied at the next boot, or now by `sysctl --system`.
mkdir -p -- "$R/etc/sysctl.d"
install_file /etc/sysctl.d/90-dmzbroker.conf 0644 <"$HERE/sysctl/90-dmzbroker.conf"

# The example configuration, never over the operator's own.
if [[ -e $R$ETC/broker.yaml || -L $R$ETC/broker.yaml ]]; then
    say "kept $ETC/broker.yaml"
else
    install_file $ETC/broker.yaml 0644 <"$HERE/broker.yaml"
    say "edit $ETC/broker.yaml, then provision the keys and certificates and run this again"
fi

# Secrets that exist: each readable by the one user that needs it.
# The root audit key is root's alone: `dmzbroker audit enroll` (and `run` as root) certify
# each writer's first epoch with it, so no half ever reads it (ADR 0018).
ensure_secret $ETC/audit.key root:root 0600
if has_user "$ENTERPRISE"; then
    ensure_secret $ETC/tls/server.key "$ENTERPRISE:$ENTERPRISE" 0600
    # The enterprise outputs' logins and keys: the PostgreSQL sink's, the OPC UA server's.
    for secret in "$R$ETC"/postgres/*.key "$R$ETC"/postgres/*password* \
                  "$R$ETC"/opcua-server/*-key.pem; do
        if [[ -e $secret || -L $secret ]]; then  # else the pattern matched nothing
            ensure_secret "${secret#"$R"}" "$ENTERPRISE:$ENTERPRISE" 0600
        fi
    done
fi
if [[ $ROLE != it-host && -d $R$ETC/opcua ]]; then
    for secret in "$R$ETC"/opcua/*-key.pem "$R$ETC"/opcua/*password*; do
        if [[ -e $secret || -L $secret ]]; then  # else the pattern matched nothing
            ensure_secret "${secret#"$R"}" "$PLANT:$PLANT" 0600
        fi
    done
fi

if [[ ! -x $R$PREFIX/bin/dmzbroker ]]; then
    say "note: $PREFIX/bin/dmzbroker is not installed yet; the units start it"
fi
if [[ -e $R$ETC/audit.key ]]; then
    say "$ETC/audit.key is root's alone (0600): before the units' first start, run" \
        "$PREFIX/bin/dmzbroker audit enroll --config $ETC/broker.yaml"
fi
say "done; then: systemctl daemon-reload && systemctl enable --now ${UNITS[*]/%/.service}"
