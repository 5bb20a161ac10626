//! The `coordinator` command line: runs a multi-worker job on the head node.

mod job;
mod limits;
mod loss_curve;
mod membership;
mod metrics_log;
mod plan;
mod planner;
mod progress;
mod run;
mod service;
mod state;
mod store;

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Tessera coordinator: rendezvous, per-step cost-balanced sharding and progress for `worker --rank N` processes"
)]
struct Cli {
    /// The job config (TOML): model, train, optim, data and cluster sections.
    #[arg(long)]
    config: PathBuf,
    /// Address the gRPC service listens on.
    #[arg(long, default_value = "0.0.0.0:29500")]
    listen: SocketAddr,
    /// Output and state folder: metrics.jsonl, loss_curve.svg, model/ (saved
    /// by rank 0) and coordinator.redb, the job's durable state. A
    /// coordinator started again on the same folder resumes the job.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A worker silent for this many heartbeat intervals is declared dead.
    #[arg(long, default_value_t = 10.0)]
    missed_heartbeats: f64,
    /// A file holding the job token every worker must present (else the
    /// TESSERA_JOB_TOKEN environment variable; neither: no token).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Requests a second each client connection may make (bursts of twice
    /// that); more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 200.0)]
    rate_limit: f64,
    /// Requests larger than this many bytes are refused (OUT_OF_RANGE).
    #[arg(long, default_value_t = 1 << 20)]
    max_message_bytes: usize,
    /// Serve TLS with this certificate (PEM, with its chain) and key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: workers must present a certificate signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    tessera_worker::logging::init();
    let cli = Cli::parse();
    let out = cli.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(cli.config.file_stem().map(|s| s.to_owned()).unwrap_or_else(|| "job".into()))
    });
    let token = match tessera_worker::auth::JobToken::load(cli.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            return ExitCode::from(2);
        }
    };
    let opts = run::RunOptions {
        config: cli.config,
        listen: cli.listen,
        out: out.clone(),
        missed_heartbeats: cli.missed_heartbeats,
        token,
        rate_limit: cli.rate_limit,
        max_message_bytes: cli.max_message_bytes,
        tls: match (cli.tls_cert, cli.tls_key) {
            (Some(cert), Some(key)) => Some(tessera_worker::tls::ServerTls { cert, key, client_ca: cli.tls_client_ca }),
            _ => None,
        },
    };
    match run::run(&opts) {
        Ok(report) => {
            run::print_report(&report, &out);
            match report.outcome {
                state::Outcome::Finished => ExitCode::SUCCESS,
                state::Outcome::Failed(why) => {
                    eprintln!("coordinator: the job failed: {why}");
                    ExitCode::FAILURE
                }
                state::Outcome::Running => ExitCode::FAILURE,
            }
        }
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            ExitCode::from(2)
        }
    }
}
