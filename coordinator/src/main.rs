//! The `coordinator` command line: runs a multi-worker job on the head node.

mod job;
mod limits;
mod loss_curve;
mod membership;
mod metrics_log;
mod plan;
mod planner;
mod progress;
mod prometheus;
mod run;
mod service;
mod state;
mod status;
mod store;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Tessera coordinator: rendezvous, per-step cost-balanced sharding and progress for `worker --rank N` processes",
    long_about = "Tessera coordinator: rendezvous, per-step cost-balanced sharding and progress for `worker --rank N` processes.\n\nWithout a subcommand it runs a job: `coordinator --config JOB.toml [--listen ADDR] [--out DIR]`. `coordinator status --url URL` shows a running job.",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Shows a running job at a glance: generation, outcome, step and ETA,
    /// recent loss, throughput, last checkpoint, restarts, and every rank.
    Status {
        /// The coordinator's gRPC URL, e.g. http://head-node:29500.
        #[arg(long)]
        url: String,
        #[command(flatten)]
        client: tessera_proto::client::ClientArgs,
    },
}

/// Running a job (the flags given without a subcommand).
#[derive(clap::Args)]
struct RunArgs {
    /// The job config (TOML): model, train, optim, data and cluster sections.
    #[arg(long, required = true)]
    config: Option<PathBuf>,
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
    /// that; each heartbeat on a stream counts as one); more get
    /// RESOURCE_EXHAUSTED. A worker makes a few calls a step, so this leaves
    /// room for steps of a few milliseconds.
    #[arg(long, default_value_t = 1000.0)]
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
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464);
    /// with a job token, a scrape must send `Authorization: Bearer TOKEN`.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    tessera_job::logging::init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Status { url, client }) => show_status(&url, client),
        None => run_job(cli.run),
    }
}

/// `coordinator status`: prints the job, or one line saying why it cannot.
fn show_status(url: &str, client: tessera_proto::client::ClientArgs) -> ExitCode {
    let shown = client.resolve().and_then(|(token, tls)| status::query(url, token.as_ref(), tls.as_ref()));
    match shown {
        Ok(s) => {
            print!("{}", status::render(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("coordinator status: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_job(cli: RunArgs) -> ExitCode {
    // clap requires --config when there is no subcommand.
    let Some(config) = cli.config else {
        eprintln!("coordinator: --config is required");
        return ExitCode::from(2);
    };
    let out = cli.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(config.file_stem().map(|s| s.to_owned()).unwrap_or_else(|| "job".into()))
    });
    let token = match tessera_proto::auth::JobToken::load(cli.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            return ExitCode::from(2);
        }
    };
    let opts = run::RunOptions {
        config,
        listen: cli.listen,
        out: out.clone(),
        missed_heartbeats: cli.missed_heartbeats,
        token,
        rate_limit: cli.rate_limit,
        max_message_bytes: cli.max_message_bytes,
        tls: match (cli.tls_cert, cli.tls_key) {
            (Some(cert), Some(key)) => Some(tessera_proto::tls::ServerTls { cert, key, client_ca: cli.tls_client_ca }),
            _ => None,
        },
        metrics_listen: cli.metrics_listen,
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
