#!/bin/sh
# Pack dist/flowspec-agent/ behind packaging/agent-installer.sh: one self-extracting file.
set -eu
cd "$(dirname "$0")/.."
[ -x dist/flowspec-agent/flowspec-agent ] || { echo "dist/flowspec-agent is missing: run make dist first" >&2; exit 1; }
out=dist/flowspec-agent-installer-linux-$(uname -m).sh
tmp=$out.partial
{ cat packaging/agent-installer.sh; echo "__FLOWSPEC_PAYLOAD__"; tar -czf - -C dist/flowspec-agent .; } > "$tmp"
chmod 755 "$tmp"
mv "$tmp" "$out"
echo "$out: $(du -h "$out" | cut -f1)"
