#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Offline tests of the CloudLab setup (no CloudLab access needed):
#   1. profile.py through geni-lib 0.9.9.4 from PyPI, in a throwaway virtual
#      environment with its Python-3 fixes applied there (tests/patch_genilib.py),
#      for every combination of the checked parameter values (tests/check_profile.py);
#   2. bash -n, and shellcheck when installed, on every script;
#   3. setup.sh --dry-run against a stub geni-get: the plan, markers, re-runs,
#      a failed phase, argument errors;
#   4. the Debian bookworm apt source and pin that setup.sh writes, on this
#      Debian host with an isolated APT configuration (never /etc/apt).
# Needs network access to PyPI and deb.debian.org. Run from anywhere:
#   bash cloudlab/tests/run.sh
# Exit status 0 only when every check passed. SHELLCHECK=/path/to/shellcheck
# picks a shellcheck that is not on PATH.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# No __pycache__ in the repository.
export PYTHONDONTWRITEBYTECODE=1
readonly SETUP=cloudlab/setup.sh
TMP=$(mktemp -d "${TMPDIR:-/tmp}/krr-cloudlab-test.XXXXXX")
readonly TMP
trap 'rm -rf "$TMP"' EXIT
# Readable by others: the non-root check runs the script as nobody.
chmod 0755 "$TMP"

FAILURES=()
pass() { echo "PASS: $*"; }
fail() {
    echo "FAIL: $*"
    FAILURES+=("${1%%$'\n'*}")
}
skip() { echo "SKIP: $*"; }
section() { printf '\n== %s\n' "$*"; }
# Last lines of a file, indented, for failure messages.
tail_of() { tail -n "${2:-15}" "$1" | sed 's/^/    /'; }

# ---- 1. profile.py ------------------------------------------------------------

test_profile() {
    section "profile.py through geni-lib 0.9.9.4 (throwaway virtual environment)"
    local venv=$TMP/venv
    if ! python3 -m venv "$venv" >"$TMP/venv.log" 2>&1; then
        fail "profile: python3 -m venv failed (Debian package python3-venv missing?):"
        tail_of "$TMP/venv.log"
        return
    fi
    if ! "$venv/bin/pip" install --disable-pip-version-check --no-input --timeout 30 --retries 2 \
        geni-lib==0.9.9.4 six >"$TMP/pip.log" 2>&1; then
        fail "profile: cannot install geni-lib==0.9.9.4 and six from PyPI (is PyPI reachable from this host?); pip says:"
        tail_of "$TMP/pip.log"
        return
    fi
    pass "profile: geni-lib 0.9.9.4 and six installed from PyPI into $venv"
    if ! "$venv/bin/python" cloudlab/tests/patch_genilib.py; then
        fail "profile: geni-lib's Python-3 fixes did not apply (cloudlab/tests/patch_genilib.py)"
        return
    fi
    # CloudLab reads profile.py at the repository's top level.
    local profile=profile.py
    if [[ ! -f $profile ]]; then
        fail "profile: no $profile at the repository's top level"
        return
    fi
    echo "checking $profile"
    if "$venv/bin/python" cloudlab/tests/check_profile.py "$profile"; then
        pass "profile: $profile: RSpecs checked (node type, image URN, startup command with eval and shard, node count, blockstore, instructions)"
    else
        fail "profile: $profile: RSpec checks failed (above)"
    fi
}

# ---- 2. syntax and shellcheck -------------------------------------------------

test_scripts() {
    section "bash -n and shellcheck on every script"
    local emitted=$TMP/emitted
    if ! bash "$SETUP" --emit-files "$emitted" >"$TMP/emit.log" 2>&1; then
        fail "scripts: setup.sh --emit-files failed:"
        tail_of "$TMP/emit.log"
        return
    fi
    local bash_scripts=("$SETUP" cloudlab/tests/run.sh
        "$emitted/usr/local/sbin/krr-host-tuning" "$emitted/host-record.sh")
    local sh_scripts=("$emitted/etc/profile.d/krr.sh")
    local f ok=1
    for f in "${bash_scripts[@]}"; do
        bash -n "$f" || { fail "scripts: bash -n $f"; ok=0; }
    done
    for f in "${sh_scripts[@]}"; do
        sh -n "$f" || { fail "scripts: sh -n $f"; ok=0; }
    done
    local py=(cloudlab/tests/patch_genilib.py cloudlab/tests/check_profile.py profile.py)
    python3 -c 'import ast, sys
for f in sys.argv[1:]:
    ast.parse(open(f).read(), f)' "${py[@]}" || { fail "scripts: Python syntax"; ok=0; }
    if ((ok)); then
        pass "scripts: bash -n / sh -n / Python parse of ${#bash_scripts[@]} bash, ${#sh_scripts[@]} sh and ${#py[@]} Python files (generated ones from setup.sh --emit-files)"
    fi

    local shellcheck=${SHELLCHECK:-$(command -v shellcheck || true)}
    if [[ -z $shellcheck ]]; then
        skip "shellcheck is not installed (Debian package: shellcheck); only bash -n checked the scripts"
        return
    fi
    if "$shellcheck" "${bash_scripts[@]}" && "$shellcheck" -s sh "${sh_scripts[@]}"; then
        pass "scripts: shellcheck ($("$shellcheck" --version | sed -n 's/^version: //p')) finds nothing"
    else
        fail "scripts: shellcheck (above)"
    fi
}

# ---- 3. setup.sh --dry-run ----------------------------------------------------

readonly BASE_PHASES="host-tuning base-packages debian-keyring debian-apt-source rust-toolchain repository host-packages build images host-record hw-acceptance"

# Stub geni-get: the experiment user and the node's name.
make_stub() {
    mkdir -p "$TMP/bin"
    cat >"$TMP/bin/geni-get" <<'EOF'
#!/bin/sh
case "$1" in
    user_urn) echo "urn:publicid:IDN+emulab.net+user+alice" ;;
    client_id) echo "node2" ;;
    *) echo "geni-get stub: unknown key $1" >&2; exit 1 ;;
esac
EOF
    chmod +x "$TMP/bin/geni-get"
}

# dry_run STATE_DIR OUT ARGS...: setup.sh's output (timestamps cut) in OUT;
# its exit status is returned.
dry_run() {
    local state=$1 out=$2
    shift 2
    local rc=0
    env -u SUDO_USER PATH="$TMP/bin:$PATH" bash "$SETUP" --dry-run --state-dir "$state" "$@" \
        >"$out.raw" 2>&1 || rc=$?
    sed -E 's/^\[[0-9TZ:-]+\] //' "$out.raw" >"$out"
    return "$rc"
}

phases_started() { sed -nE 's/^== phase ([a-z-]+)$/\1/p' "$1" | tr '\n' ' ' | sed 's/ $//'; }

# check_plan NAME OUT STATE EVAL SHARD: a first run's plan.
check_plan() {
    local name=$1 out=$2 state=$3 eval=$4 shard=$5
    local problems=() want got e suffix=""
    local evals=()
    case $eval in
        record-perf | bug-repro) evals=("$eval") ;;
        both) evals=(record-perf bug-repro) ;;
    esac
    want=$BASE_PHASES
    for e in "${evals[@]}"; do want+=" eval-$e"; done

    [[ $(head -n 1 "$out") == "krr setup: log in $state/dry-run/setup.log" ]] ||
        problems+=("first line is '$(head -n 1 "$out")', not the log's path")
    got=$(phases_started "$out")
    [[ $got == "$want" ]] || problems+=("phases '$got', expected '$want'")
    grep -qxF "+ [as alice in /mydata/krr] cargo xtask setup" "$out" ||
        problems+=("no 'cargo xtask setup' as alice (the user from the geni-get stub)")
    grep -qxF "+ [as alice in /mydata/krr] cargo build --release" "$out" || problems+=("no release build")
    # debootstrap needs root; what root built is handed back to the user.
    grep -qxF "+ [as root in /mydata/krr] cargo xtask images build" "$out" || problems+=("no image build as root")
    grep -qxF "+ chown -R alice:alice /mydata/krr /mydata/cache /mydata/rust" "$out" ||
        problems+=("the image build's files are not handed back to alice")
    grep -qF "host-node2.txt" "$out" || problems+=("host record not named after the stub's client_id node2")
    local toolchain
    toolchain=$(sed -n 's/^readonly RUST_TOOLCHAIN=//p' "$SETUP")
    grep -qF -- "--default-toolchain $toolchain " "$out" || problems+=("no pinned toolchain '$toolchain'")
    grep -qE '^    \| Pin-Priority: -1$' "$out" || problems+=("the apt pin (Pin-Priority: -1) is not written")
    grep -qF "sha256 $(sed -n 's/^readonly KEYRING_SHA256=//p' "$SETUP")" "$out" ||
        problems+=("the keyring is not fetched by its sha256")
    if [[ -n $shard ]]; then suffix="-shard-${shard%/*}-of-${shard#*/}"; fi
    for e in "${evals[@]}"; do
        local line="+ [as alice in /mydata/krr] cargo xtask eval $e --out /mydata/krr/results/$e/cloudlab$suffix${shard:+ --shard $shard}"
        grep -qxF -- "$line" "$out" || problems+=("no line '$line'")
    done
    local n_evals
    n_evals=$(grep -c 'cargo xtask eval ' "$out" || true)
    ((n_evals == ${#evals[@]})) || problems+=("$n_evals 'cargo xtask eval' commands, expected ${#evals[@]}")
    if [[ -z $shard ]] && grep -qF -- "--shard" "$out"; then problems+=("--shard without a shard"); fi
    [[ $(cat "$state/dry-run/status" 2>/dev/null) == DONE ]] ||
        problems+=("status is '$(cat "$state/dry-run/status" 2>/dev/null)', not DONE")
    for e in $want; do
        [[ -f $state/dry-run/phase-$e.done ]] || problems+=("no marker phase-$e.done")
    done
    [[ ! -e $state/status ]] || problems+=("a dry run wrote $state/status (a real setup's status)")

    if ((${#problems[@]})); then
        fail "dry run $name: $(printf '\n    %s' "${problems[@]}")"
        tail_of "$out" 40
    else
        pass "dry run $name: phases in order, commands as the experiment user, eval command(s)${shard:+ with --shard $shard}, status DONE, markers"
    fi
}

test_dry_run() {
    section "setup.sh --dry-run with a stub geni-get"
    make_stub
    local name eval shard state out args
    for name in none record-perf bug-repro both both-shard-2-of-3 record-perf-shard-1-of-1; do
        state=$TMP/state-$name
        out=$TMP/$name.out
        shard=
        case $name in
            *-shard-*) shard=${name##*-shard-}; shard=${shard/-of-//}; eval=${name%%-shard-*} ;;
            *) eval=$name ;;
        esac
        args=(--eval "$eval")
        if [[ -n $shard ]]; then args+=(--shard "$shard"); fi
        if ! dry_run "$state" "$out" "${args[@]}"; then
            fail "dry run $name: setup.sh ${args[*]} --dry-run failed:"
            tail_of "$out"
            continue
        fi
        check_plan "$name" "$out" "$state" "$eval" "$shard"

        # Again: every phase skipped, nothing run.
        if ! dry_run "$state" "$out.2" "${args[@]}"; then
            fail "dry run $name, second run: failed:"
            tail_of "$out.2"
            continue
        fi
        local ran skipped total
        ran=$(grep -c '^+ ' "$out.2" || true)
        skipped=$(grep -cE '^== phase [a-z-]+: done before .*, skipped$' "$out.2" || true)
        total=$(wc -w <<<"$(phases_started "$out")")
        if ((ran == 0 && skipped == total)) && [[ $(cat "$state/dry-run/status") == DONE ]]; then
            pass "dry run $name, second run: all $total phases skipped by their markers, no command, status DONE"
        else
            fail "dry run $name, second run: $ran commands run, $skipped of $total phases skipped:"
            tail_of "$out.2"
        fi
    done

    # A finished setup asked for an evaluation runs only that.
    out=$TMP/none-then-bug-repro.out
    if dry_run "$TMP/state-none" "$out" --eval bug-repro &&
        [[ $(phases_started "$out") == eval-bug-repro ]]; then
        pass "dry run: after --eval none, --eval bug-repro runs only eval-bug-repro"
    else
        fail "dry run: after --eval none, --eval bug-repro ran: '$(phases_started "$out")'"
        tail_of "$out"
    fi

    # A failed phase: FAILED <phase>, no marker for it; the next run resumes there.
    state=$TMP/state-fail
    out=$TMP/fail.out
    local rc=0
    KRR_SETUP_DRY_RUN_FAIL=build dry_run "$state" "$out" --eval record-perf || rc=$?
    if ((rc != 0)) && [[ $(cat "$state/dry-run/status") == "FAILED build" ]] &&
        [[ -f $state/dry-run/phase-host-packages.done && ! -e $state/dry-run/phase-build.done ]] &&
        grep -qF "FAILED in phase build" "$out" && ! grep -qF "phase images" "$out"; then
        pass "dry run: a failing phase stops the setup with status 'FAILED build' (exit $rc), no later phase"
    else
        fail "dry run: simulated failure of build: exit $rc, status '$(cat "$state/dry-run/status" 2>/dev/null)'"
        tail_of "$out"
    fi
    if dry_run "$state" "$out.2" --eval record-perf &&
        [[ $(phases_started "$out.2") == "build images host-record hw-acceptance eval-record-perf" ]] &&
        [[ $(cat "$state/dry-run/status") == DONE ]]; then
        pass "dry run: the run after the failure starts at build and ends DONE"
    else
        fail "dry run: the run after the failure ran '$(phases_started "$out.2")'"
        tail_of "$out.2"
    fi

    # The user: --user wins over geni-get; without either, a clear error.
    out=$TMP/user.out
    if dry_run "$TMP/state-user" "$out" --user bob &&
        grep -qxF "+ [as bob in /mydata/krr] cargo build --release" "$out"; then
        pass "dry run: --user bob is the build's user"
    else
        fail "dry run: --user bob not used"
        tail_of "$out"
    fi
    if [[ -x /usr/local/etc/emulab/geni-get ]] || command -v geni-get >/dev/null; then
        skip "dry run without any user source: this host has a real geni-get"
    else
        rc=0
        env -u SUDO_USER PATH=/usr/sbin:/usr/bin:/sbin:/bin bash "$SETUP" --dry-run \
            --state-dir "$TMP/state-nouser" >"$TMP/nouser.out" 2>&1 || rc=$?
        if ((rc != 0)) && grep -qF "cannot tell the experiment user" "$TMP/nouser.out" &&
            [[ $(cat "$TMP/state-nouser/dry-run/status") == "FAILED start" ]]; then
            pass "dry run: no --user, no SUDO_USER, no geni-get: refused, naming the problem"
        else
            fail "dry run without a user: exit $rc"
            tail_of "$TMP/nouser.out"
        fi
    fi

    # Argument errors: exit 2 with a message, before anything is written.
    local bad
    for bad in "--eval foo" "--shard 4/3" "--shard 0/3" "--shard 2" "--shard" "--frobnicate"; do
        rc=0
        # shellcheck disable=SC2086 # split on purpose
        bash "$SETUP" --dry-run --state-dir "$TMP/state-bad" $bad >"$TMP/bad.out" 2>&1 || rc=$?
        if ((rc == 2)) && [[ ! -e $TMP/state-bad ]] && grep -q . "$TMP/bad.out"; then
            pass "arguments: '$bad' refused (exit 2): $(head -n 1 "$TMP/bad.out")"
        else
            fail "arguments: '$bad': exit $rc, expected 2 and nothing written"
            tail_of "$TMP/bad.out"
        fi
    done

    # Without --dry-run, a user other than root is refused.
    if ((EUID == 0)) && command -v runuser >/dev/null; then
        install -m 0644 "$SETUP" "$TMP/setup.sh"
        rc=0
        runuser -u nobody -- bash "$TMP/setup.sh" --state-dir "$TMP/state-nobody" \
            >"$TMP/nobody.out" 2>&1 || rc=$?
        if ((rc == 1)) && grep -qF "needs root" "$TMP/nobody.out" && [[ ! -e $TMP/state-nobody ]]; then
            pass "setup.sh as a user other than root (without --dry-run): refused"
        else
            fail "setup.sh as nobody: exit $rc"
            tail_of "$TMP/nobody.out"
        fi
    elif ((EUID != 0)); then
        rc=0
        bash "$SETUP" --state-dir "$TMP/state-nobody" >"$TMP/nobody.out" 2>&1 || rc=$?
        if ((rc == 1)) && grep -qF "needs root" "$TMP/nobody.out"; then
            pass "setup.sh without root (and without --dry-run): refused"
        else
            fail "setup.sh without root: exit $rc"
            tail_of "$TMP/nobody.out"
        fi
    fi
}

# ---- 4. the apt source and pin -------------------------------------------------

# check_keyring_deb DEB INRELEASE: the keyring .deb installs with setup.sh's
# dpkg options (into a scratch root: its maintainer scripts do nothing on a
# first install) without touching apt's global trust, and its keyring
# verifies bookworm's InRelease.
check_keyring_deb() {
    local deb=$1 inrelease=$2 root=$TMP/dpkg-root
    local exclude='--path-exclude=/etc/apt/trusted.gpg.d/*'
    if ! grep -qF -- "dpkg --path-exclude='/etc/apt/trusted.gpg.d/*' -i" "$SETUP"; then
        fail "keyring: setup.sh no longer installs the keyring with $exclude; update this check"
        return
    fi
    [[ -f $deb ]] || { fail "keyring: no $deb to install"; return; }
    mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/log"
    : >"$root/var/lib/dpkg/status"
    : >"$root/var/lib/dpkg/available"
    if ! dpkg --root="$root" --admindir="$root/var/lib/dpkg" --log="$root/var/log/dpkg.log" \
        --force-script-chrootless --force-not-root "$exclude" -i "$deb" >"$TMP/dpkg.log" 2>&1; then
        fail "keyring: dpkg $exclude -i $(basename "$deb") into a scratch root failed:"
        tail_of "$TMP/dpkg.log"
        return
    fi
    local ring=$root/usr/share/keyrings/debian-archive-keyring.gpg
    if [[ -s $ring && -z $(find "$root/etc/apt/trusted.gpg.d" -mindepth 1 2>/dev/null) ]]; then
        pass "keyring: the .deb installs with $exclude: $ring, nothing in /etc/apt/trusted.gpg.d"
    else
        fail "keyring: after dpkg -i: keyring $([[ -s $ring ]] && echo present || echo missing), trusted.gpg.d: $(find "$root/etc/apt/trusted.gpg.d" -mindepth 1 -printf '%f ' 2>/dev/null)"
        return
    fi
    if gpgv --keyring "$ring" "$inrelease" >"$TMP/gpgv.log" 2>&1; then
        pass "keyring: it verifies bookworm's InRelease (gpgv)"
    else
        fail "keyring: gpgv with it does not verify $inrelease:"
        tail_of "$TMP/gpgv.log"
    fi
}

test_apt_pin() {
    section "the Debian bookworm apt source and pin, isolated APT configuration"
    if ! command -v apt-get >/dev/null; then
        fail "apt: no apt-get here; this check needs a Debian host"
        return
    fi
    local emitted=$TMP/emitted/etc/apt
    if [[ ! -f $emitted/sources.list.d/krr-debian-bookworm.sources || ! -f $emitted/preferences.d/krr-debian-bookworm ]]; then
        fail "apt: setup.sh --emit-files wrote no apt source or pin (see the scripts section)"
        return
    fi
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    if [[ ! -s $keyring ]]; then
        fail "apt: no $keyring on this host (Debian package debian-archive-keyring)"
        return
    fi
    local version sha256
    version=$(sed -n 's/^readonly KEYRING_VERSION=//p' "$SETUP")
    sha256=$(sed -n 's/^readonly KEYRING_SHA256=//p' "$SETUP")

    local a=$TMP/apt
    mkdir -p "$a/etc/apt.conf.d" "$a/etc/sources.list.d" "$a/etc/preferences.d" "$a/etc/trusted.gpg.d" \
        "$a/state/lists/partial" "$a/cache/archives/partial" "$a/log" "$a/download"
    : >"$a/etc/apt.conf"
    : >"$a/status"
    cp "$TMP/emitted/etc/apt/sources.list.d/krr-debian-bookworm.sources" "$a/etc/sources.list.d/"
    cp "$TMP/emitted/etc/apt/preferences.d/krr-debian-bookworm" "$a/etc/preferences.d/"
    # Read before APT_CONFIG points away from the host's configuration: a
    # proxy the host needs to reach deb.debian.org.
    local proxies
    proxies=$(apt-config dump 2>/dev/null | grep -iE '^Acquire::(http|https)::Proxy ' || true)
    # APT_CONFIG first, then Dir::Etc::Parts and ::main, both inside $a: the
    # host's /etc/apt is never read (nor written).
    cat >"$a/apt.conf" <<EOF
Dir::Etc "$a/etc/";
Dir::Etc::Parts "apt.conf.d";
Dir::Etc::main "apt.conf";
Dir::Etc::sourcelist "sources.list";
Dir::Etc::sourceparts "sources.list.d";
Dir::Etc::preferences "preferences";
Dir::Etc::preferencesparts "preferences.d";
Dir::Etc::trusted "trusted.gpg";
Dir::Etc::trustedparts "trusted.gpg.d";
Dir::State "$a/state/";
Dir::State::status "$a/status";
Dir::Cache "$a/cache/";
Dir::Log "$a/log/";
APT::Sandbox::User "root";
APT::Architecture "amd64";
APT::Architectures { "amd64"; };
Acquire::Languages "none";
$proxies
EOF
    local stamp=$TMP/apt-stamp
    touch "$stamp"
    apt_iso() { APT_CONFIG="$a/apt.conf" LC_ALL=C "$@"; }

    if ! apt_iso apt-get -q update >"$TMP/apt-update.log" 2>&1 ||
        grep -qE '^(W|E): ' "$TMP/apt-update.log"; then
        fail "apt: apt-get update of the bookworm source failed or warned (is deb.debian.org reachable? does $keyring verify it?):"
        tail_of "$TMP/apt-update.log"
        return
    fi
    pass "apt: apt-get update of setup.sh's bookworm source, verified with $keyring only (Signed-By; no trusted.gpg.d)"

    local policy suite ok=1
    policy=$(apt_iso apt-cache policy)
    for suite in bookworm bookworm-updates bookworm-security; do
        grep -Eq "^ *-1 http://deb\.debian\.org/debian(-security)? $suite/main " <<<"$policy" ||
            { fail "apt: $suite is not at priority -1: $(grep -E " $suite/main " <<<"$policy" || echo 'not listed')"; ok=0; }
    done
    if ((ok)); then pass "apt: bookworm, bookworm-updates and bookworm-security at priority -1"; fi

    if (cd "$a/download" && apt_iso apt-get -q download "debian-archive-keyring=$version") >"$TMP/apt-dl.log" 2>&1; then
        local got
        got=$(sha256sum "$a/download/debian-archive-keyring_${version}_all.deb" | cut -d' ' -f1)
        if [[ $got == "$sha256" ]]; then
            pass "apt: apt-get download debian-archive-keyring=$version works; sha256 = setup.sh's KEYRING_SHA256"
        else
            fail "apt: the downloaded debian-archive-keyring $version has sha256 $got, setup.sh pins $sha256"
        fi
    else
        fail "apt: apt-get download debian-archive-keyring=$version failed:"
        tail_of "$TMP/apt-dl.log"
    fi
    check_keyring_deb "$a/download/debian-archive-keyring_${version}_all.deb" \
        "$a/state/lists/deb.debian.org_debian_dists_bookworm_InRelease"
    if (cd "$a/download" && apt_iso apt-get -q download debian-archive-keyring) >"$TMP/apt-dl2.log" 2>&1; then
        fail "apt: apt-get download debian-archive-keyring without a version worked: the pin takes nothing away"
    else
        pass "apt: apt-get download without a version finds no candidate"
    fi

    local rc=0
    apt_iso apt-get install -s debian-archive-keyring >"$TMP/apt-inst.log" 2>&1 || rc=$?
    if ((rc != 0)) && ! grep -q '^Inst ' "$TMP/apt-inst.log"; then
        pass "apt: apt-get install -s debian-archive-keyring refused (exit $rc): $(grep -m1 '^E: ' "$TMP/apt-inst.log" || true)"
    else
        fail "apt: apt-get install -s debian-archive-keyring was not refused (exit $rc):"
        tail_of "$TMP/apt-inst.log"
    fi
    rc=0
    apt_iso apt-get install -s "debian-archive-keyring=$version" >"$TMP/apt-inst2.log" 2>&1 || rc=$?
    if ((rc == 0)) && grep -q "^Inst debian-archive-keyring ($version " "$TMP/apt-inst2.log"; then
        pass "apt: an explicit version (apt-get install -s debian-archive-keyring=$version) is still allowed"
    else
        fail "apt: apt-get install -s debian-archive-keyring=$version: exit $rc"
        tail_of "$TMP/apt-inst2.log"
    fi
    # Why -1: at priority 1, a package only this source has is installed.
    sed 's/^Pin-Priority: -1$/Pin-Priority: 1/' "$TMP/emitted/etc/apt/preferences.d/krr-debian-bookworm" \
        >"$a/etc/preferences.d/krr-debian-bookworm"
    if apt_iso apt-get install -s debian-archive-keyring 2>&1 | grep -q '^Inst debian-archive-keyring'; then
        pass "apt: (control) with Pin-Priority 1 the same install would go ahead, so -1 is what refuses it"
    else
        fail "apt: (control) with Pin-Priority 1 the install was refused too: the refusal above proves nothing"
    fi
    cp "$TMP/emitted/etc/apt/preferences.d/krr-debian-bookworm" "$a/etc/preferences.d/"

    # The guest images' pinned Debian packages (manifests/*.yaml: a `package:`
    # line then its `version:`), as krr's store asks apt for them.
    local pins missing=() pkg ver
    pins=$(awk '
        /^[[:space:]]*package:[[:space:]]*/ { p = $2; next }
        /^[[:space:]]*version:[[:space:]]*/ && p != "" { v = $2; gsub(/"/, "", v); print p, v; p = "" }
        { p = "" }' manifests/*.yaml | sort -u)
    if [[ -z $pins ]]; then
        fail "apt: no Debian package pins found in manifests/*.yaml (package: / version: lines); the check needs updating"
    else
        while read -r pkg ver; do
            apt_iso apt-cache show "$pkg=$ver" >/dev/null 2>&1 || missing+=("$pkg=$ver")
        done <<<"$pins"
        if ((${#missing[@]})); then
            fail "apt: the bookworm source lacks pinned versions from manifests/: ${missing[*]}"
        else
            pass "apt: every pinned guest package in manifests/ is available: $(awk '{ printf "%s%s=%s", (NR > 1 ? ", " : ""), $1, $2 }' <<<"$pins")"
        fi
    fi

    local touched
    touched=$(find /etc/apt -newer "$stamp" 2>/dev/null | head -n 5)
    if [[ -z $touched ]]; then
        pass "apt: the host's /etc/apt untouched"
    else
        fail "apt: changed on the host during the test: $touched"
    fi
}

test_profile
test_scripts
test_dry_run
test_apt_pin

echo
if ((${#FAILURES[@]})); then
    echo "cloudlab tests: ${#FAILURES[@]} FAILED:"
    printf '  %s\n' "${FAILURES[@]}"
    exit 1
fi
echo "cloudlab tests: all passed"
