#!/usr/bin/env bash
# Idempotent install, as root on Debian 12, of the system packages the agent
# and its tests need:
#   - python3-venv, python3-pip: the project's virtual environment;
#   - python3-bpfcc: BCC 0.26 for /usr/bin/python3 (not on PyPI);
#   - linux-headers-amd64, merged into one tree that BCC can compile against;
#   - prometheus (with promtool), prometheus-alertmanager (with amtool),
#     openssl: the metrics, alert rules and dashboards are tested against them;
#   - qemu-system-x86: a real VMM the live agent is tested against;
#   - busybox-static: the initramfs of tests/vm/run-kernel, which boots
#     Debian's 6.1 and 6.12 kernels under QEMU (it fetches those kernels and
#     their headers into its own cache, installing nothing);
#   - tracefs mounted (BCC attaches tracepoints through it).
# Reruns skip apt when the packages are there (no network needed) and rebuild
# the merged header tree only when the header package version changed.
#
# The headers are Debian's (6.1), not the running kernel's: BCC needs *some*
# kernel tree to build its programs, but the agent takes every struct offset
# from the running kernel's BTF, never from these headers.
#
# Prints the line `BCC_KERNEL_SOURCE=<dir>` last; the agent's loader uses that
# directory by default when the variable is not set.
set -euo pipefail

HEADERS_DIR="${XSTATE_AGENT_HEADERS:-/var/lib/xstate-agent/kernel-headers}"
PACKAGES=(python3-venv python3-pip python3-bpfcc linux-headers-amd64 prometheus prometheus-alertmanager openssl
          qemu-system-x86 busybox-static)

[ "$(id -u)" = 0 ] || { echo "install-deps: must run as root" >&2; exit 1; }

need=()
for pkg in "${PACKAGES[@]}"; do
    # "install ok installed" only: a removed-but-configured package still answers dpkg -s.
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "install-deps: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# linux-headers-amd64 is a metapackage: its dependency names the versioned
# package, e.g. linux-headers-6.1.0-41-amd64, which depends on ...-common.
arch_pkg=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[^ ,]*-amd64' | head -n1)
common_pkg=${arch_pkg%-amd64}-common
arch_dir=/usr/src/$arch_pkg
common_dir=/usr/src/$common_pkg
for d in "$arch_dir" "$common_dir"; do
    [ -d "$d" ] || { echo "install-deps: missing $d (is $arch_pkg installed?)" >&2; exit 1; }
done

# Debian splits the tree: -common has the generic headers, -amd64 the
# generated ones (autoconf.h, generated/, Module.symvers, .config). BCC
# fails with either alone, so overlay -amd64 on -common with symlinks.
want="$arch_pkg $(dpkg-query -W -f='${Version}' "$arch_pkg") $common_pkg $(dpkg-query -W -f='${Version}' "$common_pkg")"
stamp="$HEADERS_DIR/.xstate-agent-source"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "install-deps: merging $common_dir + $arch_dir into $HEADERS_DIR" >&2
    parent=$(dirname "$HEADERS_DIR")
    mkdir -p "$parent"
    tmp=$(mktemp -d "$parent/.kernel-headers.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    chmod 755 "$tmp"  # mktemp makes it 0700; non-root tools may read headers too
    cp -rs "$common_dir/." "$tmp/"
    # --remove-destination: a file of -amd64 replaces the -common link of the same name.
    cp -rs --remove-destination "$arch_dir/." "$tmp/"
    echo "$want" >"$tmp/.xstate-agent-source"
    rm -rf "$HEADERS_DIR"
    mv "$tmp" "$HEADERS_DIR"
    trap - EXIT
fi

# tracefs is not mounted at boot on the CI machines.
if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing
fi

echo "BCC_KERNEL_SOURCE=$HEADERS_DIR"
