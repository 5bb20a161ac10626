# Sourced by tools/bench_coordinator.sh and tools/bench_heartbeat_load.sh
# (from the repository root): builds the release binaries and the named
# example, prints the machine, raises the open-file limit (each side holds
# one socket per simulated client) and runs the example with the given
# arguments.

source tools/machine.sh

run_coordinator_bench() {
    local example=$1
    shift
    local target="${CARGO_TARGET_DIR:-target}"
    print_machine coordinator worker proto

    echo "== build"
    cargo build --release -p tessera-worker -p tessera-coordinator --bin worker --bin coordinator --example "$example"

    # Raise the soft open-file limit to the hard one when it is lower.
    local hard
    hard=$(ulimit -Hn)
    if [ "$hard" = unlimited ] || [ "$(ulimit -n)" -lt "$hard" ]; then
        ulimit -n "$hard" 2>/dev/null || true
    fi
    echo "open files: soft $(ulimit -n), hard $(ulimit -Hn)"

    echo "== run (loadavg before: $(cut -d" " -f1-3 /proc/loadavg))"
    "$target/release/examples/$example" --bin-dir "$target/release" "$@"
    echo "(loadavg after: $(cut -d" " -f1-3 /proc/loadavg))"
}
