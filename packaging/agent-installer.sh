#!/bin/sh
# FlowSpec agent installer for Linux: installs the frozen agent for the current user, sets up a
# systemd user service that starts at boot and restarts on failure, and prints the pairing code.
#
#   sh flowspec-agent-installer.sh [--name NAME] [--port PORT] [--cluster-secret SECRET] [--no-service]
#   sh flowspec-agent-installer.sh --uninstall [--purge]
#
# Files: the program in ~/.local/share/flowspec-agent, a link in ~/.local/bin, the unit in
# ~/.config/systemd/user/flowspec-agent.service. --purge also deletes the agent's keys, id and
# trusted clients (paired apps must pair again). Nothing is written outside your home directory;
# only `loginctl enable-linger` (start at boot before you log in) may ask for your password.
set -eu

NAME=$(hostname 2>/dev/null || echo agent)
PORT=5555
SECRET=""
SERVICE=1
ACTION=install
PURGE=0
DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
CONFIG_HOME=${XDG_CONFIG_HOME:-$HOME/.config}
PREFIX=$DATA_HOME/flowspec-agent
BIN_DIR=$HOME/.local/bin
UNIT_DIR=$CONFIG_HOME/systemd/user
UNIT=$UNIT_DIR/flowspec-agent.service
ENV_FILE=$CONFIG_HOME/flowspec-agent.env

die() { echo "flowspec-agent installer: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --name) [ $# -ge 2 ] || die "--name needs a value"; NAME=$2; shift 2 ;;
        --port) [ $# -ge 2 ] || die "--port needs a value"; PORT=$2; shift 2 ;;
        --cluster-secret) [ $# -ge 2 ] || die "--cluster-secret needs a value"; SECRET=$2; shift 2 ;;
        --no-service) SERVICE=0; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
case "$PORT" in ''|*[!0-9]*) die "--port must be a number, got '$PORT'" ;; esac

have_systemd() { command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; }

uninstall() {
    if [ -f "$UNIT" ] && have_systemd; then
        systemctl --user disable --now flowspec-agent.service >/dev/null 2>&1 || true
    fi
    rm -f "$UNIT" "$ENV_FILE"
    if [ -L "$BIN_DIR/flowspec-agent" ]; then rm -f "$BIN_DIR/flowspec-agent"; fi
    rm -rf "$PREFIX" "$PREFIX.new"
    if have_systemd; then systemctl --user daemon-reload || true; fi
    if [ "$PURGE" = 1 ]; then
        STATE=${XDG_STATE_HOME:-$HOME/.local/state}/flowspec-agent
        rm -rf "$STATE"
        echo "removed the agent, its service and its keys ($STATE)"
    else
        echo "removed the agent and its service; its keys and trusted clients stay in" \
             "${XDG_STATE_HOME:-$HOME/.local/state}/flowspec-agent (--uninstall --purge deletes them)"
    fi
}

install() {
    line=$(awk '/^__FLOWSPEC_PAYLOAD__$/ { print NR + 1; exit 0 }' "$0")
    [ -n "$line" ] || die "this installer is damaged (no payload); download it again"
    mkdir -p "$DATA_HOME" "$BIN_DIR"
    rm -rf "$PREFIX.new"
    mkdir -p "$PREFIX.new"
    tail -n +"$line" "$0" | tar -xzf - -C "$PREFIX.new" || die "cannot unpack the agent into $PREFIX.new (disk full?)"
    [ -x "$PREFIX.new/flowspec-agent" ] || die "the payload holds no flowspec-agent program; download the installer again"
    # Replace the old program only once the new one is complete.
    rm -rf "$PREFIX.old"
    if [ -d "$PREFIX" ]; then mv "$PREFIX" "$PREFIX.old"; fi
    mv "$PREFIX.new" "$PREFIX"
    rm -rf "$PREFIX.old"
    ln -sf "$PREFIX/flowspec-agent" "$BIN_DIR/flowspec-agent"
    echo "installed the agent in $PREFIX ($BIN_DIR/flowspec-agent)"
    if [ -n "$SECRET" ]; then
        umask 077
        mkdir -p "$CONFIG_HOME"
        printf 'FLOWSPEC_CLUSTER_SECRET=%s\n' "$SECRET" > "$ENV_FILE"
        umask 022
    fi
    if [ "$SERVICE" = 1 ]; then
        mkdir -p "$UNIT_DIR"
        cat > "$UNIT" <<UNIT_EOF
[Unit]
Description=FlowSpec agent: runs pipeline stages for FlowSpec Studio
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$PREFIX/flowspec-agent --name "$NAME" --port $PORT
EnvironmentFile=-$ENV_FILE
Restart=on-failure
RestartSec=3

[Install]
WantedBy=default.target
UNIT_EOF
        if have_systemd; then
            systemctl --user daemon-reload
            systemctl --user enable --now flowspec-agent.service
            if ! loginctl enable-linger "$(id -un)" 2>/dev/null; then
                echo "note: the service starts when you log in; to start it at boot run: sudo loginctl enable-linger $(id -un)"
            fi
            echo "service flowspec-agent started (systemctl --user status flowspec-agent; journalctl --user -u flowspec-agent)"
        else
            echo "note: no systemd user session here; the unit is in $UNIT, or start the agent by hand:" \
                 "flowspec-agent --name \"$NAME\" --port $PORT"
        fi
    fi
    "$PREFIX/flowspec-agent" --show-pairing-code
    echo "open FlowSpec Studio, pick this device ($NAME, port $PORT) and enter the code to pair"
}

if [ "$ACTION" = uninstall ]; then uninstall; else install; fi
exit 0
