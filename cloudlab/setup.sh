#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# One-shot setup of a CloudLab node for krr, started by profile.py's
# startup service (`sudo bash /local/repository/cloudlab/setup.sh --eval ...`)
# at every boot. Each finished phase leaves a marker in the state directory
# and is skipped afterwards, so a reboot or a re-run continues where it
# stopped. See cloudlab/README.md.
set -euo pipefail

readonly SOURCE_REPO=/local/repository
readonly DATA=/mydata
readonly REPO=$DATA/krr
readonly KRR_CACHE_DIR=$DATA/cache
readonly RUST_DIR=$DATA/rust
readonly TMP_DIR=$DATA/tmp
# Cargo.lock's dependencies need rustc >= 1.88 (icu_*, postcard), above the
# workspace's rust-version (1.85); 1.95.0 is what the project is tested with.
readonly RUST_TOOLCHAIN=1.95.0

# A Debian archive keyring that verifies bookworm (Ubuntu 22.04's is too old),
# for the bookworm apt source and debootstrap.
readonly KEYRING_VERSION=2023.3+deb12u2
readonly KEYRING_SHA256=f699e2f88dca05212f2a452b58475f2993cb6993dfbafb1d0205a3291eb8b4b8
readonly KEYRING_DEB=debian-archive-keyring_${KEYRING_VERSION}_all.deb
readonly KEYRING_URLS=(
    "http://deb.debian.org/debian/pool/main/d/debian-archive-keyring/$KEYRING_DEB"
    # Once a newer point release replaces it in the pool.
    "http://snapshot.debian.org/archive/debian/20250601T000000Z/pool/main/d/debian-archive-keyring/${KEYRING_DEB/+/%2B}"
)
readonly DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

readonly APT_SOURCES=/etc/apt/sources.list.d/krr-debian-bookworm.sources
readonly APT_PIN=/etc/apt/preferences.d/krr-debian-bookworm
readonly TUNING_SCRIPT=/usr/local/sbin/krr-host-tuning
readonly TUNING_UNIT=/etc/systemd/system/krr-host-tuning.service
readonly PROFILE_ENV=/etc/profile.d/krr.sh
# What building xtask itself needs before `cargo xtask setup` can run.
readonly BASE_PACKAGES=(ca-certificates curl git gcc libc6-dev)

usage() {
    cat <<EOF
usage: sudo bash setup.sh [--eval none|record-perf|bug-repro|both] [--shard K/N]
                          [--user NAME] [--state-dir DIR] [--dry-run]
       bash setup.sh --emit-files DIR

Sets up this CloudLab node for krr, phase by phase (host tuning, packages,
the Debian bookworm apt source and keyring, Rust, the repository under
$REPO, build, guest images), then runs the chosen evaluation with
KRR_CACHE=$KRR_CACHE_DIR; results under $REPO/results.

  --eval WHICH      evaluation to run after setup (default: none)
  --shard K/N       run shard K of N of each evaluation (1 <= K <= N)
  --user NAME       the experiment user who owns the build (default: the
                    user who ran sudo, else geni-get user_urn)
  --state-dir DIR   markers, status and log (default: $DATA/krr-setup)
  --dry-run         print the commands instead of running them; needs no
                    root; its markers, status and log go to DIR/dry-run
  --emit-files DIR  write the files the setup installs (apt source and pin,
                    host tuning script and unit, profile environment) under
                    DIR, as DIR/etc/..., and the host record script as
                    DIR/host-record.sh, then exit (for tests)

Status: DIR/status holds RUNNING <phase>, DONE or FAILED <phase> on its
first line (after DONE, a line for each evaluation that finished with
failed cells or unreproduced bugs); each finished phase leaves
DIR/phase-<name>.done.
EOF
}

usage_error() {
    echo "setup.sh: $*" >&2
    echo "run 'bash setup.sh --help' for usage" >&2
    exit 2
}

EVAL=none
SHARD=
RUN_USER=
STATE_DIR=$DATA/krr-setup
DRY_RUN=0
EMIT_DIR=

while (($#)); do
    case $1 in
        --eval | --shard | --user | --state-dir | --emit-files)
            (($# >= 2)) || usage_error "$1 needs a value"
            case $1 in
                --eval) EVAL=$2 ;;
                --shard) SHARD=$2 ;;
                --user) RUN_USER=$2 ;;
                --state-dir) STATE_DIR=$2 ;;
                --emit-files) EMIT_DIR=$2 ;;
            esac
            shift 2
            ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage_error "unknown argument '$1'" ;;
    esac
done

case $EVAL in
    none | record-perf | bug-repro | both) ;;
    *) usage_error "--eval must be none, record-perf, bug-repro or both, not '$EVAL'" ;;
esac
if [[ -n $SHARD ]]; then
    if ! [[ $SHARD =~ ^([1-9][0-9]*)/([1-9][0-9]*)$ ]] ||
        ((BASH_REMATCH[1] > BASH_REMATCH[2])); then
        usage_error "--shard must be K/N with 1 <= K <= N, not '$SHARD'"
    fi
fi
[[ -n $STATE_DIR ]] || usage_error "--state-dir must not be empty"

# ---- the files the setup installs -------------------------------------------

# Pin-Priority -1: no version from these suites is ever a candidate, so
# `apt-get install pkg` and upgrades never take one, while an explicit
# version (`apt-get download pkg=version`, as krr's store fetches the guest
# images' packages) still works. With 1, a package that only Debian has
# would still be installed by a plain `apt-get install`.
apt_pin() {
    cat <<'EOF'
Explanation: krr (cloudlab/setup.sh): Debian bookworm only for explicit versions
Explanation: (apt-get download pkg=version), never installed or upgraded from.
Package: *
Pin: release o=Debian
Pin-Priority: -1
EOF
}

# bookworm-security holds the kernel sources the guest images pin.
apt_sources() {
    cat <<EOF
# krr (cloudlab/setup.sh): Debian bookworm for the guest images' pinned
# packages and debootstrap; pinned in $APT_PIN so nothing installs from it.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Architectures: amd64
Signed-By: $DEBIAN_KEYRING

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Architectures: amd64
Signed-By: $DEBIAN_KEYRING
EOF
}

tuning_script() {
    cat <<'EOF'
#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# krr host tuning, at every boot (krr-host-tuning.service, written by krr's
# cloudlab/setup.sh): SMT and turbo off for stable timings, perf events for
# the PMU, KVM, and no NMI watchdog holding a PMU counter.
set -u
failed=()
note() { echo "krr-host-tuning: $*"; }
fail() {
    echo "krr-host-tuning: ERROR: $*" >&2
    failed+=("${1%%:*}")
}

smt=/sys/devices/system/cpu/smt/control
if [[ -e $smt ]]; then
    # off, forceoff, notsupported and notimplemented need nothing.
    if [[ $(cat "$smt") == on ]]; then
        echo off >"$smt" || fail "SMT: cannot write 'off' to $smt"
    fi
else
    note "SMT: no $smt (kernel without SMT control)"
fi

if [[ -e /sys/devices/system/cpu/intel_pstate/no_turbo ]]; then
    echo 1 >/sys/devices/system/cpu/intel_pstate/no_turbo ||
        fail "turbo: cannot write 1 to /sys/devices/system/cpu/intel_pstate/no_turbo"
elif [[ -e /sys/devices/system/cpu/cpufreq/boost ]]; then
    echo 0 >/sys/devices/system/cpu/cpufreq/boost ||
        fail "turbo: cannot write 0 to /sys/devices/system/cpu/cpufreq/boost"
else
    note "turbo: neither intel_pstate/no_turbo nor cpufreq/boost: left as the firmware set it"
fi

sysctl -q -w kernel.perf_event_paranoid=-1 || fail "perf_event_paranoid: sysctl failed"
if [[ -e /proc/sys/kernel/nmi_watchdog ]]; then
    sysctl -q -w kernel.nmi_watchdog=0 || fail "nmi_watchdog: sysctl failed"
fi

modprobe kvm_intel ||
    fail "kvm_intel: modprobe failed (VT-x off in the firmware, or not an Intel CPU?)"
[[ -c /dev/kvm ]] || fail "kvm: no /dev/kvm"

read_or() { cat "$1" 2>/dev/null || echo "$2"; }
note "smt_active=$(read_or /sys/devices/system/cpu/smt/active n/a)" \
    "no_turbo=$(read_or /sys/devices/system/cpu/intel_pstate/no_turbo n/a)" \
    "boost=$(read_or /sys/devices/system/cpu/cpufreq/boost n/a)" \
    "perf_event_paranoid=$(read_or /proc/sys/kernel/perf_event_paranoid n/a)" \
    "nmi_watchdog=$(read_or /proc/sys/kernel/nmi_watchdog n/a)" \
    "kvm=$([[ -c /dev/kvm ]] && echo yes || echo no)"
if ((${#failed[@]})); then
    note "FAILED: ${failed[*]}"
    exit 1
fi
EOF
}

tuning_unit() {
    cat <<EOF
# krr (cloudlab/setup.sh)
[Unit]
Description=krr host tuning: SMT and turbo off, perf events, kvm_intel, NMI watchdog off
After=systemd-sysctl.service systemd-modules-load.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=$TUNING_SCRIPT

[Install]
WantedBy=multi-user.target
EOF
}

profile_env() {
    cat <<EOF
# krr (cloudlab/setup.sh): the Rust toolchain, image cache and scratch space
# on the local disk ($DATA), not the small network home directory.
export RUSTUP_HOME=$RUST_DIR/rustup
export CARGO_HOME=$RUST_DIR/cargo
export KRR_CACHE=$KRR_CACHE_DIR
export TMPDIR=$TMP_DIR
case ":\$PATH:" in
    *":$RUST_DIR/cargo/bin:"*) ;;
    *) export PATH="$RUST_DIR/cargo/bin:\$PATH" ;;
esac
EOF
}

# What the results ran on; run as the experiment user with the node's name
# and the output file.
host_record_script() {
    cat <<'EOF'
#!/bin/bash
# SPDX-License-Identifier: GPL-2.0-or-later
# krr (cloudlab/setup.sh): the host, toolchain and image versions of a node.
set -u
node=$1
out=$2
mkdir -p "$(dirname "$out")"
section() {
    local title=$1
    shift
    printf '\n## %s\n' "$title"
    "$@" 2>&1 || echo "(failed: $*)"
}
{
    echo "# krr host record: $node, $(date -u +%FT%TZ)"
    section "kernel" uname -a
    section "distribution" grep PRETTY_NAME /etc/os-release
    section "CPU" lscpu
    section "tuning" systemctl --no-pager status krr-host-tuning.service
    section "perf_event_paranoid" cat /proc/sys/kernel/perf_event_paranoid
    section "/dev/kvm" ls -l /dev/kvm
    section "disk" df -h /mydata
    section "user" id
    section "rustc" rustc -vV
    section "gcc" gcc --version
    section "qemu" qemu-system-x86_64 --version
    section "host packages" dpkg-query -W gcc qemu-system-x86 debootstrap debian-archive-keyring libclang-dev
    section "krr backend" target/release/krr backend
    section "guest images" cargo xtask images list
} >"$out"
echo "host record: $out"
EOF
}

emit_files() {
    local dir=$1 path gen mode
    while read -r path gen mode; do
        mkdir -p "$dir$(dirname "$path")"
        "$gen" >"$dir$path"
        chmod "$mode" "$dir$path"
        echo "$dir$path"
    done <<EOF
$APT_SOURCES apt_sources 0644
$APT_PIN apt_pin 0644
$TUNING_SCRIPT tuning_script 0755
$TUNING_UNIT tuning_unit 0644
$PROFILE_ENV profile_env 0644
/host-record.sh host_record_script 0755
EOF
}

if [[ -n $EMIT_DIR ]]; then
    emit_files "$EMIT_DIR"
    exit 0
fi

# ---- running, logging, markers ----------------------------------------------

if ((!DRY_RUN)) && ((EUID != 0)); then
    echo "setup.sh: needs root: sudo bash $0 ... (or --dry-run to see the plan)" >&2
    exit 1
fi

# Without the blockstore, builds and images would fill the small root disk.
if ((!DRY_RUN)) && ! mountpoint -q "$DATA"; then
    echo "setup.sh: $DATA is not a mounted file system (the profile's local blockstore); not filling the root disk" >&2
    exit 1
fi

# A dry run keeps its own markers, so it never marks a real setup's phases.
if ((DRY_RUN)); then RUN_DIR=$STATE_DIR/dry-run; else RUN_DIR=$STATE_DIR; fi
mkdir -p "$RUN_DIR/downloads"
LOG=$RUN_DIR/setup.log
echo "krr setup: log in $LOG"
exec > >(tee -a "$LOG") 2>&1

exec 9>>"$RUN_DIR/lock"
if ! flock -n 9; then
    echo "setup.sh: another setup.sh holds $RUN_DIR/lock; let it finish (its log: $LOG)" >&2
    exit 1
fi

PHASE=start
log() { printf '[%s] %s\n' "$(date -u +%FT%TZ)" "$*"; }
# Names a failing command that run/as_user did not (errexit then exits).
set -E
trap 'log "ERROR in phase $PHASE: exit $? from: $BASH_COMMAND (setup.sh line $LINENO)"' ERR
die() {
    log "ERROR in phase $PHASE: $*"
    exit 1
}
set_status() {
    printf '%s\n' "$*" >"$RUN_DIR/status.tmp"
    mv -f "$RUN_DIR/status.tmp" "$RUN_DIR/status"
}
on_exit() {
    local rc=$?
    if ((rc != 0)); then
        set_status "FAILED $PHASE"
        log "FAILED in phase $PHASE (exit $rc); status in $RUN_DIR/status, log in $LOG"
    fi
}
trap on_exit EXIT

quoted() {
    local s
    s=$(printf '%q ' "$@")
    printf '%s' "${s% }"
}

# Runs a command (or only prints it, in a dry run); a failure names the
# command and the phase.
run() {
    log "+ $(quoted "$@")"
    if ((DRY_RUN)); then return 0; fi
    local rc=0
    "$@" || rc=$?
    ((rc == 0)) || die "exit $rc from: $(quoted "$@")"
}

# Runs a command as the experiment user, in directory $1, with a clean
# environment, and returns its status (only prints it, in a dry run).
try_as_user() {
    local dir=$1
    shift
    log "+ [as $RUN_USER in $dir] $(quoted "$@")"
    if ((DRY_RUN)); then return 0; fi
    (cd "$dir" && runuser -u "$RUN_USER" -- env -i "${USER_ENV[@]}" "$@")
}

# As try_as_user; a failure stops the setup, naming the command.
as_user() {
    local rc=0
    try_as_user "$@" || rc=$?
    ((rc == 0)) || die "exit $rc from (as $RUN_USER in $1): $(quoted "${@:2}")"
}

# Writes stdin to a root-owned file (printed in a dry run).
write_file() {
    local path=$1 mode=$2 content tmp
    content=$(cat)
    log "+ write $path (mode $mode)"
    if ((DRY_RUN)); then
        printf '%s\n' "$content" | sed 's/^/    | /'
        return 0
    fi
    install -d -m 0755 "$(dirname "$path")"
    tmp=$(mktemp "$path.XXXXXX")
    printf '%s\n' "$content" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$path"
}

apt_get() {
    run env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 "$@"
}

# CloudLab's node metadata; a test puts a stub first in PATH.
geni_get() {
    local bin
    bin=$(command -v geni-get) || bin=/usr/local/etc/emulab/geni-get
    [[ -x $bin ]] || return 1
    "$bin" "$@" 2>/dev/null
}

resolve_user() {
    if [[ -z $RUN_USER && -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
        RUN_USER=$SUDO_USER
    fi
    if [[ -z $RUN_USER ]]; then
        local urn
        urn=$(geni_get user_urn) || urn=
        if [[ $urn == *+user+* ]]; then RUN_USER=${urn##*+user+}; fi
    fi
    [[ -n $RUN_USER ]] ||
        die "cannot tell the experiment user: no --user, no SUDO_USER, and geni-get user_urn gave nothing"
    if id -u "$RUN_USER" >/dev/null 2>&1; then
        RUN_GROUP=$(id -gn "$RUN_USER")
        USER_HOME=$(getent passwd "$RUN_USER" | cut -d: -f6)
    elif ((DRY_RUN)); then
        RUN_GROUP=$RUN_USER
        USER_HOME=/users/$RUN_USER
    else
        die "user '$RUN_USER' does not exist on this host"
    fi
    local common=(
        LANG=C.UTF-8
        PATH="$RUST_DIR/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        RUSTUP_HOME="$RUST_DIR/rustup" CARGO_HOME="$RUST_DIR/cargo"
        KRR_CACHE="$KRR_CACHE_DIR" TMPDIR="$TMP_DIR"
    )
    USER_ENV=(HOME="$USER_HOME" USER="$RUN_USER" LOGNAME="$RUN_USER" "${common[@]}")
    ROOT_ENV=(HOME=/root USER=root LOGNAME=root "${common[@]}")
}

# ---- phases -----------------------------------------------------------------

phase_host_tuning() {
    write_file "$TUNING_SCRIPT" 0755 < <(tuning_script)
    write_file "$TUNING_UNIT" 0644 < <(tuning_unit)
    run systemctl daemon-reload
    run systemctl enable krr-host-tuning.service
    log "+ systemctl restart krr-host-tuning.service"
    if ((!DRY_RUN)) && ! systemctl restart krr-host-tuning.service; then
        journalctl -b -u krr-host-tuning.service --no-pager | tail -n 30 || true
        die "krr-host-tuning.service failed (its output is above; journalctl -u krr-host-tuning)"
    fi
    # /dev/kvm is root:kvm 0660 on Ubuntu.
    getent group kvm >/dev/null || run groupadd --system kvm
    run usermod -a -G kvm "$RUN_USER"
}

phase_base_packages() {
    apt_get update
    apt_get install -y --no-install-recommends "${BASE_PACKAGES[@]}"
}

fetch_keyring() {
    local dest=$1 url got
    log "+ fetch $dest (sha256 $KEYRING_SHA256) from ${KRR_KEYRING_DEB:+$KRR_KEYRING_DEB, }${KEYRING_URLS[*]}"
    if ((DRY_RUN)); then return 0; fi
    if [[ -f $dest ]] && [[ $(sha256sum <"$dest" | cut -d' ' -f1) == "$KEYRING_SHA256" ]]; then
        log "already here and verified: $dest"
        return 0
    fi
    for url in ${KRR_KEYRING_DEB:+"$KRR_KEYRING_DEB"} "${KEYRING_URLS[@]}"; do
        rm -f "$dest.part"
        if [[ $url == /* ]]; then
            cp "$url" "$dest.part" || { log "WARNING: cannot copy $url"; continue; }
        elif ! curl -fsSL --retry 3 --connect-timeout 20 -o "$dest.part" "$url"; then
            log "WARNING: cannot download $url"
            continue
        fi
        got=$(sha256sum <"$dest.part" | cut -d' ' -f1)
        if [[ $got == "$KEYRING_SHA256" ]]; then
            mv -f "$dest.part" "$dest"
            log "fetched and verified: $url"
            return 0
        fi
        log "WARNING: $url has sha256 $got, not $KEYRING_SHA256"
    done
    rm -f "$dest.part"
    die "no verified $KEYRING_DEB (sha256 $KEYRING_SHA256); download it elsewhere, copy it here and run: sudo KRR_KEYRING_DEB=/path/to/$KEYRING_DEB bash $0 ..."
}

phase_debian_keyring() {
    local deb=$RUN_DIR/downloads/$KEYRING_DEB installed
    fetch_keyring "$deb"
    installed=$(dpkg-query -W -f='${Status} ${Version}' debian-archive-keyring 2>/dev/null) || installed=
    if [[ $installed == "install ok installed "* ]] &&
        dpkg --compare-versions "${installed##* }" ge "$KEYRING_VERSION"; then
        log "debian-archive-keyring ${installed##* } is installed (>= $KEYRING_VERSION): kept"
    else
        # Debian's keys verify the bookworm source (Signed-By) and debootstrap
        # only: Ubuntu's apt does not trust them for everything.
        run dpkg --path-exclude='/etc/apt/trusted.gpg.d/*' -i "$deb"
    fi
    if ((!DRY_RUN)) && [[ ! -s $DEBIAN_KEYRING ]]; then
        die "$DEBIAN_KEYRING is missing after installing $KEYRING_DEB"
    fi
}

check_pin() {
    log "+ check: apt-cache policy lists bookworm, bookworm-updates and bookworm-security at priority -1"
    if ((DRY_RUN)); then return 0; fi
    local policy suite
    policy=$(apt-cache policy) || die "apt-cache policy failed"
    for suite in bookworm bookworm-updates bookworm-security; do
        grep -Eq "^ *-1 http://deb\.debian\.org/debian(-security)? $suite/main " <<<"$policy" ||
            die "the pin in $APT_PIN does not hold for $suite: $(grep -E " $suite/main " <<<"$policy" || echo 'suite not listed')"
    done
}

phase_debian_apt_source() {
    write_file "$APT_SOURCES" 0644 < <(apt_sources)
    write_file "$APT_PIN" 0644 < <(apt_pin)
    apt_get update
    check_pin
}

phase_rust_toolchain() {
    run install -d -m 0755 -o "$RUN_USER" -g "$RUN_GROUP" "$RUST_DIR" "$KRR_CACHE_DIR"
    run install -d -m 1777 "$TMP_DIR"
    if [[ -x $RUST_DIR/cargo/bin/rustup ]]; then
        as_user "$DATA" rustup toolchain install "$RUST_TOOLCHAIN" --profile minimal -c rustfmt -c clippy
    else
        local init=$RUN_DIR/downloads/rustup-init.sh
        run curl --proto '=https' --tlsv1.2 -fsSL --retry 3 -o "$init" https://sh.rustup.rs
        as_user "$DATA" sh "$init" -y --no-modify-path --profile minimal \
            --default-toolchain "$RUST_TOOLCHAIN" -c rustfmt -c clippy
    fi
    as_user "$DATA" rustup default "$RUST_TOOLCHAIN"
    as_user "$DATA" rustc --version
    write_file "$PROFILE_ENV" 0644 < <(profile_env)
}

phase_repository() {
    if ((!DRY_RUN)); then
        [[ -d $SOURCE_REPO/.git ]] || die "$SOURCE_REPO is not a git repository (the profile's clone)"
        [[ ! -e $REPO ]] || die "$REPO exists but this setup did not finish copying it; move it away and run again"
    fi
    # Copied aside, then renamed: a copy cut short is never taken for the repository.
    run rm -rf "$REPO.partial"
    run cp -a "$SOURCE_REPO" "$REPO.partial"
    run chown -R "$RUN_USER:$RUN_GROUP" "$REPO.partial"
    run mv "$REPO.partial" "$REPO"
}

phase_host_packages() {
    as_user "$REPO" cargo xtask setup
}

phase_build() {
    as_user "$REPO" cargo build --release
}

# debootstrap (the workloads' root filesystem) runs only as root: the images
# are built as root with the user's toolchain and cache, which are then
# handed back to the user.
phase_images() {
    log "+ [as root in $REPO] cargo xtask images build"
    if ((DRY_RUN)); then
        run chown -R "$RUN_USER:$RUN_GROUP" "$REPO" "$KRR_CACHE_DIR" "$RUST_DIR"
        return 0
    fi
    local rc=0
    (cd "$REPO" && env -i "${ROOT_ENV[@]}" cargo xtask images build) || rc=$?
    run chown -R "$RUN_USER:$RUN_GROUP" "$REPO" "$KRR_CACHE_DIR" "$RUST_DIR"
    ((rc == 0)) || die "exit $rc from (as root in $REPO): cargo xtask images build"
}

phase_host_record() {
    local script=$RUN_DIR/host-record.sh
    write_file "$script" 0755 < <(host_record_script)
    as_user "$REPO" bash "$script" "$NODE" "$REPO/results/cloudlab/host-$NODE.txt"
}

# The KVM path's acceptance checks, first thing on real hardware. Checks
# that fail are a result (what the KVM path still lacks here), noted under
# DONE like an evaluation's failures; only a run that writes no report
# fails the setup. A rerun starts the checks afresh.
phase_hw_acceptance() {
    local out=$REPO/results/hw-acceptance/cloudlab-$NODE started=$RUN_DIR/hw-acceptance.started
    local note=$RUN_DIR/eval-hw-acceptance.note rc=0
    rm -f "$note"
    touch "$started"
    try_as_user "$REPO" rm -rf "$out"
    try_as_user "$REPO" cargo xtask hw-acceptance --out "$out" || rc=$?
    note_failures hw-acceptance "$rc" "$out" "$started" "$note"
}

# $1: what ran, $2: its exit status, $3: its results directory, $4: a file
# touched when it started, $5: the note for the status. A non-zero exit
# after a new report is a result (noted); without one, the setup fails.
note_failures() {
    local what=$1 rc=$2 out=$3 started=$4 note=$5
    if ((rc != 0)); then
        [[ $out/report.md -nt $started ]] ||
            die "exit $rc from cargo xtask $what, and no new report in $out"
        echo "$what: finished with failures (exit $rc): $out/report.md" >"$note"
        log "WARNING: $what finished with failures (exit $rc); $out/report.md says which"
    fi
    log "results: $out"
}

# $1: experiment, $2: its journal (an interrupted run is resumed from it).
# An eval exits non-zero when a cell failed or a bug was not reproduced,
# after writing its whole report: that is a result, not a failed setup, and
# becomes a note under DONE in the status.
run_eval() {
    local exp=$1 journal=$2 out=$REPO/results/$1/cloudlab
    local shard_args=() started=$RUN_DIR/eval-$1.started note=$RUN_DIR/eval-$1.note rc=0
    if [[ -n $SHARD ]]; then
        out+=-shard-${SHARD%/*}-of-${SHARD#*/}
        shard_args=(--shard "$SHARD")
    fi
    rm -f "$note"
    touch "$started"
    if [[ -f $out/$journal ]]; then
        try_as_user "$REPO" cargo xtask eval "$exp" --resume "$out" || rc=$?
    else
        try_as_user "$REPO" cargo xtask eval "$exp" --out "$out" "${shard_args[@]}" || rc=$?
    fi
    note_failures "eval $exp" "$rc" "$out" "$started" "$note"
}

phase_eval_record_perf() {
    run_eval record-perf runs.jsonl
}

phase_eval_bug_repro() {
    run_eval bug-repro bugs.jsonl
}

run_phase() {
    local name=$1 marker=$RUN_DIR/phase-$1.done
    PHASE=$name
    if [[ -f $marker ]]; then
        log "== phase $name: done before ($(cat "$marker")), skipped"
        return 0
    fi
    set_status "RUNNING $name"
    log "== phase $name"
    if ((DRY_RUN)) && [[ ${KRR_SETUP_DRY_RUN_FAIL:-} == "$name" ]]; then
        die "simulated failure (KRR_SETUP_DRY_RUN_FAIL=$name)"
    fi
    "phase_${name//-/_}"
    date -u +%FT%TZ >"$marker"
    log "== phase $name: done"
}

# ---- main -------------------------------------------------------------------

resolve_user
NODE=$(geni_get client_id) || NODE=
[[ $NODE =~ ^[A-Za-z0-9._-]+$ ]] || NODE=$(hostname -s)

PHASES=(host-tuning base-packages debian-keyring debian-apt-source rust-toolchain
    repository host-packages build images host-record hw-acceptance)
case $EVAL in
    record-perf) PHASES+=(eval-record-perf) ;;
    bug-repro) PHASES+=(eval-bug-repro) ;;
    both) PHASES+=(eval-record-perf eval-bug-repro) ;;
esac

mode=
if ((DRY_RUN)); then mode=" (dry run: commands are printed, not run)"; fi
log "krr setup on $NODE: eval=$EVAL${SHARD:+ shard=$SHARD} user=$RUN_USER state=$RUN_DIR$mode"
log "phases: ${PHASES[*]}"
for phase in "${PHASES[@]}"; do
    run_phase "$phase"
done
PHASE=finish
notes=$(cat "$RUN_DIR"/eval-*.note 2>/dev/null || true)
set_status "DONE${notes:+$'\n'$notes}"
log "DONE: every phase finished; results under $REPO/results${notes:+$'\n'$notes}"
