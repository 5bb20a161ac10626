//! Logging setup shared by the `worker` and `coordinator` binaries:
//! `tracing` to stderr at `info` unless RUST_LOG says otherwise, with colours
//! only on a terminal (job logs are files).

pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
