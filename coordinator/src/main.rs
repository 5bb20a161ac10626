//! The head-node coordinator. Rendezvous, sharding and the step loop land with
//! the coordinator issue; this binary says so instead of pretending to run.

fn main() {
    eprintln!(
        "coordinator: not implemented yet (protocol v{}); train on one process with `worker train`",
        tessera_proto::PROTOCOL_VERSION
    );
    std::process::exit(2);
}
