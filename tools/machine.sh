# Sourced by the benchmark scripts: prints the machine a benchmark runs on
# and the Tessera commit, noting uncommitted changes under the paths given
# (the code the benchmark measures).
print_machine() {
    echo "== machine"
    echo "date:    $(date -u)"
    echo "nproc:   $(nproc)"
    echo "cpu:     $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "memory:  $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "rustc:   $(rustc --version)"
    echo "tessera: git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- "$@" 2>/dev/null || echo " + uncommitted changes in $*")"
}
