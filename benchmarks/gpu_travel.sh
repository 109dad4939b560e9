#!/usr/bin/env bash
# What a lent GPU call carries: the tracked tree, untracked files git does not ignore, and the carried paths,
# at most 64 MiB together (/work/.library/device/README.md). The tracked weights alone (weights/*.pt and the
# resumable runs' weights under weights/logs) are over that, so a call made from a plain checkout is refused.
#   bash benchmarks/gpu_travel.sh slim       # every tracked .pt stops travelling (kept on disk; commits refused)
#   bash benchmarks/gpu_travel.sh size PATH…  # what a call carrying PATH… would send, in MiB
#   bash benchmarks/gpu_travel.sh restore    # the index as it was, commits allowed again
# A call then names the weights it needs in `carry` (research/gpu_sartorius.sh lists them). `slim` only
# changes git's index and .git/info/exclude: nothing is committed, and a pre-commit hook refuses commits
# until `restore`, so the weights cannot be committed as deleted by mistake.
set -euo pipefail
cd "$(dirname "$0")/.."
G=$(git rev-parse --git-dir)
LIST=$G/gpu-travel-slim.txt
HOOK=$G/hooks/pre-commit
MARK="# gpu_travel.sh slim"

size() {
  # tracked + untracked-not-ignored files, plus each carried path (file or folder), in bytes; fails over 64 MiB
  local tree carried=0
  tree=$({ git ls-files -z; git ls-files -z --others --exclude-standard; } | du -cb --files0-from=- 2>/dev/null |
    tail -1 | cut -f1)
  [ $# -gt 0 ] && carried=$(du -cb -- "$@" | tail -1 | cut -f1)
  awk -v a="$tree" -v b="$carried" 'BEGIN {m = 2^20; printf "tree %.1f MiB + carried %.1f MiB = %.1f MiB of 64\n",
    a / m, b / m, (a + b) / m; exit (a + b > 64 * m)}'
}

case "${1:-}" in
  slim)
    [ -f "$LIST" ] && { echo "already slim ($LIST); restore first" >&2; exit 1; }
    [ -n "$(git ls-files '*.pt')" ] || { echo "no tracked .pt" >&2; exit 1; }
    # The hook first: from here on no commit can record the weights as deleted.
    mkdir -p "$G/hooks"
    [ -e "$HOOK" ] && mv "$HOOK" "$G/hooks/pre-commit.before-slim"
    printf '#!/bin/sh\necho "gpu_travel.sh slim: the weights are out of the index; bash benchmarks/gpu_travel.sh restore first" >&2\nexit 1\n' > "$HOOK"
    chmod +x "$HOOK"
    git ls-files '*.pt' > "$LIST"
    xargs -r git rm -q --cached -- < "$LIST"
    [ -s "$G/info/exclude" ] && [ -n "$(tail -c1 "$G/info/exclude")" ] && echo >> "$G/info/exclude"
    { echo "$MARK"; sed 's#^#/#' "$LIST"; echo "$MARK end"; } >> "$G/info/exclude"
    echo "$(wc -l < "$LIST") tracked .pt files stay behind; carry those a call needs, then restore"
    size || true
    ;;
  restore)
    [ -f "$LIST" ] || { echo "not slim" >&2; exit 0; }
    xargs -r git reset -q -- < "$LIST"
    sed -i "/^$MARK\$/,/^$MARK end\$/d" "$G/info/exclude"
    rm -f "$HOOK"
    [ -e "$G/hooks/pre-commit.before-slim" ] && mv "$G/hooks/pre-commit.before-slim" "$HOOK"
    rm -f "$LIST"
    git status --short -- $(git ls-files '*.pt') | head
    echo "restored"
    ;;
  size)
    shift
    size "$@"
    ;;
  *)
    sed -n 2,10p "$0"
    exit 2
    ;;
esac
