# Helpers shared by scripts/test and scripts/demo. Sourced, not run.

if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then
    BOLD=$'\e[1m'; GREEN=$'\e[32m'; RED=$'\e[31m'; YELLOW=$'\e[33m'; DIM=$'\e[2m'; RESET=$'\e[0m'
else
    BOLD=; GREEN=; RED=; YELLOW=; DIM=; RESET=
fi

step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$RESET"; }

# need_apt PKG...: installs Debian packages that are missing.
need_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# need_cargo_tool BINARY CRATE: installs a cargo subcommand from crates.io.
need_cargo_tool() {
    command -v "$1" >/dev/null 2>&1 || cargo install --locked --quiet "$2"
}
