//! Helpers shared by the benchmarks that run real `coordinator` (and
//! `worker`) processes on 127.0.0.1 against simulated gRPC clients:
//! `bench_coordinator` and `bench_heartbeat_load`. Each example compiles
//! this module on its own and uses only part of it.
#![allow(dead_code)]

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tessera_proto::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};

/// The flags both benchmarks take: where the binaries, the demo data and
/// the job config to copy are, and how many connections to open at once.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// The job config to copy (model, optimizer, data template).
    #[arg(long, default_value = "configs/demo.toml")]
    pub base_config: PathBuf,
    /// Demo data folder; made with `worker make-demo-data` when absent.
    #[arg(long, default_value = "data/demo")]
    pub data: PathBuf,
    /// Folder with the `coordinator` and `worker` binaries (default: the
    /// folder above this example's, i.e. target/release).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Connections opened at once while setting up.
    #[arg(long, default_value_t = 128)]
    pub connect_batch: usize,
}

/// What the common flags name, made ready: the binaries' folder, the demo
/// data (made when absent) and the base config's text.
pub struct Inputs {
    pub bin_dir: PathBuf,
    pub data: PathBuf,
    pub base: String,
}

impl CommonArgs {
    pub fn inputs(&self) -> Result<Inputs> {
        let bin_dir = bin_dir(self.bin_dir.as_deref())?;
        let data = ensure_demo_data(&bin_dir.join("worker"), &self.data)?;
        let base = std::fs::read_to_string(&self.base_config)
            .with_context(|| format!("cannot read {}", self.base_config.display()))?;
        Ok(Inputs { bin_dir, data, base })
    }
}

/// Kills a child process (and reaps it) if the benchmark bails out or
/// panics while it runs. `take()` the child to wait for it normally.
pub struct Reaper(pub Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Reaper {
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// The child's exit status if it has exited (then it is reaped and
    /// taken out of the guard), or None while it runs.
    pub fn try_exit(&mut self) -> Result<Option<std::process::ExitStatus>> {
        let Some(c) = self.0.as_mut() else { bail!("the process was already reaped") };
        match c.try_wait().context("cannot poll a child process")? {
            Some(s) => {
                self.0 = None;
                Ok(Some(s))
            }
            None => Ok(None),
        }
    }
}

/// The folder with the `coordinator` and `worker` binaries: `given`, or the
/// folder above this example's (target/release for target/release/examples).
pub fn bin_dir(given: Option<&Path>) -> Result<PathBuf> {
    let dir = match given {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            exe.parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .context("cannot find target/release from this program's path")?
        }
    };
    for b in ["coordinator", "worker"] {
        if !dir.join(b).exists() {
            bail!(
                "{} is missing: cargo build --release -p tessera-worker -p tessera-coordinator (or pass --bin-dir)",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}

/// Each process holds one socket per simulated client (plus a few): refuse
/// early with the fix rather than failing halfway through a run.
pub fn check_open_files(n: usize) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    eprintln!("open-file limit (soft): {}", soft.map(|s| s.to_string()).unwrap_or_else(|| "unknown".into()));
    if let Some(soft) = soft {
        if soft < n + 256 {
            bail!(
                "the open-file limit is {soft}, too low for {n} connections (and the coordinator's {n}): \
                 raise it with `ulimit -n {}` (hard limit: `ulimit -Hn`)",
                n + 1024
            );
        }
    }
    Ok(())
}

/// `data` with the demo data in it, made with `worker make-demo-data` when
/// absent; returned absolute.
pub fn ensure_demo_data(worker: &Path, data: &Path) -> Result<PathBuf> {
    if !data.join("train.jsonl").exists() {
        eprintln!("making the demo data in {}", data.display());
        let status = Command::new(worker)
            .args(["make-demo-data", "--out"])
            .arg(data)
            .status()
            .with_context(|| format!("cannot run {}", worker.display()))?;
        if !status.success() {
            bail!("worker make-demo-data --out {} failed: {status}", data.display());
        }
    }
    data.canonicalize().with_context(|| format!("cannot resolve {}", data.display()))
}

/// The base config (configs/demo.toml) with `overrides` set (section, key,
/// value) and its data paths pointing into the absolute `data` folder.
pub fn job_config(base: &str, data: &Path, overrides: &[(&str, &str, toml::Value)]) -> Result<String> {
    let mut t: toml::Table = base.parse().context("the base config is not valid TOML")?;
    let section = |t: &mut toml::Table, name: &str| -> Result<toml::Table> {
        match t.remove(name) {
            Some(toml::Value::Table(s)) => Ok(s),
            None => Ok(toml::Table::new()),
            Some(_) => bail!("[{name}] is not a table"),
        }
    };
    for (name, key, value) in overrides {
        let mut s = section(&mut t, name)?;
        s.insert(key.to_string(), value.clone());
        t.insert(name.to_string(), toml::Value::Table(s));
    }
    let mut d = section(&mut t, "data")?;
    let s = |p: PathBuf| toml::Value::String(p.display().to_string());
    let part = |jsonl: &str| {
        let mut p = toml::Table::new();
        p.insert("path".into(), s(data.join(jsonl)));
        p.insert("image_folder".into(), s(data.join("images")));
        toml::Value::Array(vec![toml::Value::Table(p)])
    };
    d.insert("tokenizer".into(), s(data.join("tokenizer.json")));
    d.insert("datasets".into(), part("train.jsonl"));
    d.insert("eval_datasets".into(), part("eval.jsonl"));
    t.insert("data".into(), toml::Value::Table(d));
    toml::to_string(&t).context("cannot write the job config")
}

pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a port on 127.0.0.1")?;
    Ok(l.local_addr().context("listener address")?.port())
}

/// The last 15 lines of a log file.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// CPU seconds (user + system, all threads) a running process has used
/// (Linux; the kernel's clock tick is 100 Hz on every common configuration).
pub fn cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime); `after_name` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

pub fn delta(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(b? - a?)
}

/// Peak resident memory of a running process (Linux).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The value at quantile `q` of sorted `v` (nearest rank), None when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
}

/// A coordinator process on a free port of 127.0.0.1, listening.
pub struct LocalCoordinator {
    pub reaper: Reaper,
    pub pid: u32,
    pub endpoint: Endpoint,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

/// Starts `cmd` (a coordinator with its flags, less `--listen`) on a free
/// port of 127.0.0.1 with its output in `log`, and waits until it listens.
/// Calls on its endpoint time out after `call_timeout_s`.
pub async fn start_coordinator(mut cmd: Command, log: PathBuf, call_timeout_s: f64) -> Result<LocalCoordinator> {
    let port = free_port()?;
    let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let out_file = log_file.try_clone().context("cannot share the log file")?;
    let child = cmd
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(out_file)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", cmd.get_program().to_string_lossy()))?;
    let pid = child.id();
    let mut reaper = Reaper(Some(child));
    let url = format!("http://127.0.0.1:{port}");
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow!("bad URL {url}: {e}"))?
        .timeout(Duration::from_secs_f64(call_timeout_s))
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    wait_listening(&endpoint, &mut reaper, &log, Duration::from_secs(60)).await?;
    Ok(LocalCoordinator { reaper, pid, endpoint, log })
}

/// Waits until the coordinator in `reaper` accepts connections on
/// `endpoint` (it indexes the dataset first), up to `patience`.
pub async fn wait_listening(endpoint: &Endpoint, reaper: &mut Reaper, log: &Path, patience: Duration) -> Result<()> {
    let up = Instant::now();
    loop {
        if let Some(c) = reaper.0.as_mut() {
            if let Some(status) = c.try_wait().context("cannot poll the coordinator")? {
                bail!("the coordinator exited early ({status}):\n{}", log_tail(log));
            }
        }
        match endpoint.connect().await {
            Ok(_) => return Ok(()),
            Err(_) if up.elapsed() < patience => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => bail!(
                "the coordinator did not listen on {} within {} s: {e}\n{}",
                endpoint.uri(),
                patience.as_secs(),
                log_tail(log)
            ),
        }
    }
}

/// `n` clients, each on its own channel (one TCP connection), opened
/// `batch` at a time.
pub async fn connect_all(endpoint: &Endpoint, n: usize, batch: usize) -> Result<Vec<CoordinatorClient<Channel>>> {
    let mut clients: Vec<CoordinatorClient<Channel>> = Vec::with_capacity(n);
    while clients.len() < n {
        let batch = batch.max(1).min(n - clients.len());
        let handles: Vec<_> = (0..batch)
            .map(|_| {
                let e = endpoint.clone();
                tokio::spawn(async move { e.connect().await })
            })
            .collect();
        for h in handles {
            let ch =
                h.await.context("connect task")?.map_err(|e| anyhow!("cannot connect to {}: {e}", endpoint.uri()))?;
            clients.push(CoordinatorClient::new(ch));
        }
    }
    Ok(clients)
}
