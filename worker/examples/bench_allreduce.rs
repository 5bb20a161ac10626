//! All-reduce benchmark: Tessera's ring against PyTorch's gloo backend,
//! side by side in one run, on 127.0.0.1.
//!
//! The parent process starts `--world-size` copies of itself (`--rank R`),
//! one process per rank as gloo has, hands them each other's listener
//! addresses, and collects their timings. Then it runs
//! `tools/bench_allreduce_gloo.py` with the same sizes, iteration counts,
//! values and timing method, and prints one table with both bus bandwidths
//! and their ratio ours / gloo (> 1: ours is faster).
//!
//! Timing, identical on both sides: per iteration, refill the f32 buffer from
//! a template, barrier, time one in-place sum all-reduce. An iteration's time
//! is the slowest rank's; the table shows the median over iterations.
//! algbw = bytes / time; busbw = algbw * 2(n-1)/n (the NCCL convention).
//! "CPU ms/op" is the processor time (user + system, every thread, all ranks
//! together) per all-reduce, from a second pass of back-to-back all-reduces
//! of a zero buffer, at least `--iters` and at least 256 MiB in all: on a
//! loaded machine it varies much less than the wall time. Ours is read from
//! /proc/self/stat (10 ms ticks), gloo's from `time.process_time()`.
//!
//! `--transports` times the ring once per same-host link kind, e.g.
//! `shm,unix` (the default: shared memory, and the Unix-socket data path it
//! replaced), each with its own ratio to gloo.
//!
//! ```text
//! cargo run --release -p tessera-worker --example bench_allreduce -- \
//!     [--sizes-mib 1,16,128] [--iters 20] [--warmup 3] [--world-size 2] \
//!     [--transports shm,unix] [--no-gloo]
//! ```
//! or `tools/bench_allreduce.sh`, which also prints the machine.

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tessera_worker::collective::ring::{RingCollective, Transport, DEFAULT_SEGMENT_BYTES};
use tessera_worker::collective::Collective;

#[derive(Parser, Clone)]
struct Args {
    /// Buffer sizes in MiB of f32.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
    sizes_mib: Vec<f64>,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed iterations per size, first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 2)]
    world_size: usize,
    /// Ring segment size.
    #[arg(long, default_value_t = DEFAULT_SEGMENT_BYTES / 1024)]
    segment_kib: usize,
    /// Same-host link kinds to time the ring with, in this order: shm
    /// (shared memory, the default link), unix (Unix socket), tcp.
    #[arg(long, value_delimiter = ',', default_value = "shm,unix")]
    transports: Vec<String>,
    /// Python with torch, for the gloo side.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The gloo script (default: tools/bench_allreduce_gloo.py in this repository).
    #[arg(long)]
    gloo_script: Option<PathBuf>,
    /// Run only our ring.
    #[arg(long)]
    no_gloo: bool,
    /// Internal: run as this rank (the parent starts the ranks).
    #[arg(long, hide = true)]
    rank: Option<usize>,
}

fn transport(name: &str) -> Result<Transport> {
    Ok(match name {
        "shm" => Transport::Shm,
        "unix" => Transport::Unix,
        "tcp" => Transport::Tcp,
        _ => bail!("unknown transport {name:?} (shm, unix or tcp)"),
    })
}

impl Args {
    fn sizes_bytes(&self) -> Vec<usize> {
        // Whole f32 elements, divisible by nothing in particular.
        self.sizes_mib.iter().map(|m| ((m * 1048576.0) as usize / 4).max(1) * 4).collect()
    }

    /// All-reduces in the CPU pass: enough that 10 ms ticks do not matter.
    fn cpu_iters(&self, size_bytes: usize) -> usize {
        self.iters.max((256usize << 20).div_ceil(size_bytes))
    }
}

/// Timings of one size: times_s[i] is iteration i on the slowest rank;
/// cpu_s is the CPU time of all ranks over the cpu_iters of the CPU pass.
#[derive(Clone, Debug)]
struct Timing {
    size_bytes: usize,
    times_s: Vec<f64>,
    cpu_s: f64,
    cpu_iters: usize,
}

impl Timing {
    fn median(&self) -> f64 {
        let mut t = self.times_s.clone();
        t.sort_by(f64::total_cmp);
        let m = t.len() / 2;
        if t.len() % 2 == 1 {
            t[m]
        } else {
            (t[m - 1] + t[m]) / 2.0
        }
    }
    fn min(&self) -> f64 {
        self.times_s.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.times_s.iter().copied().fold(0.0, f64::max)
    }
    fn cpu_ms_per_op(&self) -> f64 {
        self.cpu_s / self.cpu_iters.max(1) as f64 * 1e3
    }
}

/// User + system CPU time of this process, all threads, in seconds (Linux;
/// 0 elsewhere). Fields 14 and 15 of /proc/self/stat, in clock ticks of
/// 1/100 s (USER_HZ, which is 100 on every mainstream Linux).
fn process_cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // The command name (field 2) may hold spaces; fields after it follow ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // rest starts at field 3, so field k is f[k - 3].
    (tick(14 - 3) + tick(15 - 3)) as f64 / 100.0
}

fn template(rank: usize, len: usize) -> Vec<f32> {
    // The same f32 operations as the gloo script: (i % 1000) * 0.001 + rank.
    (0..len).map(|i| (i % 1000) as f32 * 0.001f32 + rank as f32).collect()
}

/// One rank: print our listener's address, read every rank's, connect, time.
fn run_rank(args: &Args, rank: usize) -> Result<()> {
    let n = args.world_size;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the rank's listener")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ADDR {}", listener.local_addr()?)?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the peer list from the parent")?;
    let peers: Vec<String> = match line.trim().strip_prefix("PEERS ") {
        Some(p) => p.split(',').map(str::to_string).collect(),
        None => bail!("expected a PEERS line from the parent, got {line:?}"),
    };
    let max = transport(args.transports.first().map_or("shm", String::as_str))?;
    let mut ring =
        RingCollective::<f32>::connect_with_transport(rank, n, listener, &peers, 0, Duration::from_secs(60), max, &[])?;
    ring.set_segment_bytes(args.segment_kib * 1024);
    for size in args.sizes_bytes() {
        let len = size / 4;
        let tmpl = template(rank, len);
        let mut buf = tmpl.clone();
        for _ in 0..args.warmup {
            buf.copy_from_slice(&tmpl);
            ring.all_reduce_sum(&mut buf)?;
        }
        let mut times = Vec::with_capacity(args.iters);
        for _ in 0..args.iters {
            buf.copy_from_slice(&tmpl);
            ring.all_reduce_sum_u64(&mut [0])?; // barrier
            let t0 = Instant::now();
            ring.all_reduce_sum(&mut buf)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        // Check the result, within f32 rounding.
        let mut bad = 0usize;
        for i in (0..len).step_by((len / 1000).max(1)) {
            let want: f64 = (0..n).map(|r| ((i % 1000) as f32 * 0.001f32 + r as f32) as f64).sum();
            if (buf[i] as f64 - want).abs() > 1e-5 * want.abs().max(1.0) {
                bad += 1;
            }
        }
        if bad > 0 {
            bail!("rank {rank}: {bad} wrong sums at size {size}");
        }
        // CPU pass: zeros stay zeros, so no refill is needed between calls.
        let cpu_iters = args.cpu_iters(size);
        let mut zeros = vec![0f32; len];
        ring.all_reduce_sum_u64(&mut [0])?;
        let c0 = process_cpu_s();
        for _ in 0..cpu_iters {
            ring.all_reduce_sum(&mut zeros)?;
        }
        let cpu = process_cpu_s() - c0;
        let times: Vec<String> = times.iter().map(|t| format!("{t:e}")).collect();
        writeln!(out, "RESULT {size} {cpu:e} {cpu_iters} {}", times.join(","))?;
        out.flush()?;
    }
    Ok(())
}

/// Starts the ranks, wires them up and merges their timings.
fn run_ours(args: &Args, transport: &str) -> Result<Vec<Timing>> {
    let exe = std::env::current_exe().context("finding this benchmark's executable")?;
    let sizes: Vec<String> = args.sizes_mib.iter().map(|m| m.to_string()).collect();
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for rank in 0..args.world_size {
        let mut child = Command::new(&exe)
            .args(["--rank", &rank.to_string(), "--world-size", &args.world_size.to_string()])
            .args(["--sizes-mib", &sizes.join(","), "--iters", &args.iters.to_string()])
            .args(["--warmup", &args.warmup.to_string(), "--segment-kib", &args.segment_kib.to_string()])
            .args(["--transports", transport])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line).with_context(|| format!("reading rank {rank}'s address"))?;
        match line.trim().strip_prefix("ADDR ") {
            Some(a) => addrs.push(a.to_string()),
            None => bail!("rank {rank} printed {line:?} instead of its address"),
        }
        children.push((child, stdout));
    }
    let peers = format!("PEERS {}\n", addrs.join(","));
    for (child, _) in &mut children {
        child.stdin.take().context("no stdin")?.write_all(peers.as_bytes())?;
    }
    let mut timings: Vec<Timing> = Vec::new();
    for (rank, (mut child, stdout)) in children.into_iter().enumerate() {
        let mut k = 0;
        for line in stdout.lines() {
            let line = line?;
            let Some(rest) = line.strip_prefix("RESULT ") else { continue };
            let mut fields = rest.split(' ');
            let (Some(size), Some(cpu), Some(cpu_iters), Some(times)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                bail!("bad RESULT line from rank {rank}: {line}");
            };
            let size: usize = size.parse()?;
            let cpu: f64 = cpu.parse()?;
            let cpu_iters: usize = cpu_iters.parse()?;
            let times: Vec<f64> = times.split(',').map(str::parse).collect::<Result<_, _>>()?;
            if rank == 0 {
                timings.push(Timing { size_bytes: size, times_s: times, cpu_s: cpu, cpu_iters });
            } else {
                let Some(t) = timings.get_mut(k) else { bail!("rank {rank} timed more sizes than rank 0") };
                if t.size_bytes != size || t.times_s.len() != times.len() {
                    bail!("rank {rank} timed something else than rank 0");
                }
                for (a, b) in t.times_s.iter_mut().zip(times) {
                    *a = a.max(b);
                }
                t.cpu_s += cpu;
            }
            k += 1;
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("rank {rank} failed ({status})");
        }
    }
    Ok(timings)
}

fn run_gloo(args: &Args) -> Result<Vec<Timing>> {
    let script = args
        .gloo_script
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/bench_allreduce_gloo.py"));
    let sizes: Vec<String> = args.sizes_bytes().iter().map(|s| s.to_string()).collect();
    let cpu_iters: Vec<String> = args.sizes_bytes().iter().map(|&s| args.cpu_iters(s).to_string()).collect();
    let out = Command::new(&args.python)
        .arg(&script)
        .args(["--world-size", &args.world_size.to_string(), "--sizes-bytes", &sizes.join(",")])
        .args(["--cpu-iters", &cpu_iters.join(",")])
        .args(["--iters", &args.iters.to_string(), "--warmup", &args.warmup.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !out.status.success() {
        bail!("the gloo benchmark failed ({})", out.status);
    }
    let mut timings = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.starts_with('{') {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("bad JSON from gloo: {line}"))?;
        if v.get("info").is_some() {
            println!("gloo: {line}");
            continue;
        }
        let size = v["size_bytes"].as_u64().context("size_bytes")? as usize;
        let times = v["times_s"].as_array().context("times_s")?.iter().filter_map(|t| t.as_f64()).collect();
        let cpu = v["cpu_s"].as_f64().context("cpu_s")?;
        let cpu_iters = v["cpu_iters"].as_u64().context("cpu_iters")? as usize;
        timings.push(Timing { size_bytes: size, times_s: times, cpu_s: cpu, cpu_iters });
    }
    Ok(timings)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.world_size < 1 {
        bail!("--world-size must be at least 1");
    }
    if let Some(rank) = args.rank {
        return run_rank(&args, rank);
    }
    let n = args.world_size as f64;
    let bus = if n > 1.0 { 2.0 * (n - 1.0) / n } else { 0.0 };
    for t in &args.transports {
        transport(t)?;
    }
    println!(
        "all-reduce sum, f32, world size {}, {} warmup + {} timed iterations per size, ring segment {} KiB, ring links {}",
        args.world_size,
        args.warmup,
        args.iters,
        args.segment_kib,
        args.transports.join(", ")
    );
    let mut ours = Vec::new();
    for t in &args.transports {
        ours.push((t.clone(), run_ours(&args, t)?));
    }
    let gloo = if args.no_gloo { Vec::new() } else { run_gloo(&args)? };

    println!();
    println!(
        "| size MiB | impl | median ms (min-max) | algbw GB/s | busbw GB/s | CPU ms/op, all ranks | busbw ours/gloo | CPU gloo/ours |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    let busbw = |t: &Timing| t.size_bytes as f64 / t.median() / 1e9 * bus;
    let mut summary = Vec::new();
    let Some((_, first)) = ours.first() else { bail!("no --transports") };
    for (k, o0) in first.iter().enumerate() {
        let mib = o0.size_bytes as f64 / 1048576.0;
        let line = |name: &str, t: &Timing, ratios: &str| {
            let algbw = t.size_bytes as f64 / t.median() / 1e9;
            format!(
                "| {mib:.0} | {name} | {:.3} ({:.3}-{:.3}) | {algbw:.2} | {:.2} | {:.1} | {ratios}",
                t.median() * 1e3,
                t.min() * 1e3,
                t.max() * 1e3,
                algbw * bus,
                t.cpu_ms_per_op()
            )
        };
        let g = gloo.iter().find(|g| g.size_bytes == o0.size_bytes);
        for (name, timings) in &ours {
            let Some(o) = timings.get(k) else { bail!("the {name} run timed fewer sizes") };
            match g {
                Some(g) => {
                    let (ratio, cpu) = (busbw(o) / busbw(g), g.cpu_ms_per_op() / o.cpu_ms_per_op());
                    println!("{}", line(&format!("tessera ring, {name}"), o, &format!(" **{ratio:.2}** | {cpu:.2} |")));
                    summary.push(format!("{mib:.0} MiB {name}: {:.2} vs {:.2} GB/s = {ratio:.2}x", busbw(o), busbw(g)));
                }
                None => println!("{}", line(&format!("tessera ring, {name}"), o, " | |")),
            }
        }
        if let Some(g) = g {
            println!("{}", line("torch gloo", g, " | |"));
        }
    }
    if !summary.is_empty() {
        println!("bus bandwidth, ours vs gloo (median; > 1x: ours faster): {}", summary.join("; "));
    }
    Ok(())
}
