#!/bin/sh
# SPDX-License-Identifier: GPL-2.0-or-later
#
# Rewrites 0001-krr-agent.patch from a kernel tree that is a git repository
# whose HEAD is the pristine Debian linux-source-6.1 (at least every file the
# patch touches) and whose working tree holds the agent (new files added with
# `git add -N -f`). The description at the top of the current patch (up to
# its "---" line) is kept.
#
# Usage: refresh-patch.sh KERNEL_TREE
set -eu
tree=${1:?usage: refresh-patch.sh KERNEL_TREE}
here=$(cd "$(dirname "$0")" && pwd)
patch="$here/0001-krr-agent.patch"
if ! git -C "$tree" rev-parse --verify -q HEAD >/dev/null; then
	echo "refresh-patch.sh: $tree is not a git repository with a pristine base commit" >&2
	exit 1
fi
if [ ! -f "$tree/include/linux/krr_agent_abi.h" ]; then
	echo "refresh-patch.sh: $tree/include/linux/krr_agent_abi.h missing; generate it (see README.md)" >&2
	exit 1
fi
tmp="$patch.tmp.$$"
trap 'rm -f "$tmp"' EXIT
{
	sed '/^---$/q' "$patch"
	git -C "$tree" -c core.abbrev=12 diff --stat=72 HEAD | sed 's/^ */ /'
	echo
	git -C "$tree" -c core.abbrev=12 diff HEAD
	echo "-- "
	git --version | sed 's/^git version //'
} >"$tmp"
mv "$tmp" "$patch"
trap - EXIT
echo "wrote $patch"
