#!/bin/sh
# Render PNGs of FlowSpec Studio during a real generation (two local agents, the default model)
# under a virtual X display, into docs/screenshots/. Installs Xvfb and Qt's X11 libraries if missing.
set -eu
cd "$(dirname "$0")/../.."
PACKAGES="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-shape0 \
libxcb-randr0 libxcb-xinerama0 libxcb-xkb1 libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1 libfontconfig1 \
libdbus-1-3 fonts-dejavu-core"
if ! command -v xvfb-run >/dev/null 2>&1 || ! dpkg -s libxcb-cursor0 >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -qq $PACKAGES >/dev/null
fi
export QT_QPA_PLATFORM=xcb HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/screenshots/render.py "$@"
