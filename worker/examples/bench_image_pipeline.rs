//! Images per second through the image pipeline (decode, resize to the
//! largest S2 scale, normalize), ours against PIL + numpy doing the same on
//! the same JPEGs, in one run.
//!
//! ```text
//! cargo run --release -p tessera-worker --example bench_image_pipeline -- [--threads 2] [--reps 5]
//! ```
//! (or `tools/bench_images.sh`). Steps:
//!
//! 1. `tools/bench_images_pil.py gen` writes 200 deterministic photo-like
//!    JPEGs (quality 90, several sizes and aspect ratios) into `--dir` once.
//! 2. Parity: for one file of each size, PIL's output (the benchmarked
//!    function, `bench_images_pil.py dump`) is compared with our
//!    `load_image`, within the tolerance of the JPEG fixtures in
//!    `data/image.rs` (the decoders differ slightly), and our resize +
//!    normalize of PIL's own decoded pixels is compared with PIL's output
//!    (equal up to float rounding: the same work after decoding).
//! 3. Ours: `load_image` with the preset's image config (`vila-3b-s2`: 768,
//!    mode `resize`) on every file, in a rayon pool of 1 thread and of
//!    `--threads` threads (images in parallel, as the loader's prefetch
//!    threads load them; the resize's own row parallelism shares the pool).
//!    PIL (`bench_images_pil.py serve`, started once): the same files in one
//!    process, and in a pool of `--threads` processes (the like-for-like
//!    multi-core peer).
//! 4. `--warmup` + `--reps` rounds; each round times one pass over all files
//!    of each configuration in turn (ours 1, PIL 1, ours N, PIL N), so that
//!    machine noise hits them alike; the warm-up rounds are dropped.
//!    images/s of the median pass. Prints a Markdown table and the ratios
//!    ours / PIL (1 thread vs 1 process, N threads vs N processes).
//!
//! `--stages` adds a single-thread breakdown of our time (decode, resize,
//! normalize).

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;
use tessera_job::image::ImageConfig;
use tessera_job::model::ModelConfig;
use tessera_worker::data::image::{compare_normalized, decode_rgb8, load_image, preprocess_rgb8, resize_rgb8};

#[derive(Parser, Debug)]
#[command(about = "Image pipeline images/s: Tessera load_image vs PIL + numpy on the same JPEGs")]
struct Args {
    /// Folder of the benchmark JPEGs (made there once).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("tessera-bench-images"))]
    dir: PathBuf,
    /// How many JPEGs.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Seed of the generated JPEGs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Model preset whose largest S2 scale is the output size.
    #[arg(long, default_value = "vila-3b-s2")]
    preset: String,
    /// Cores for the multi-core comparison (rayon threads, PIL processes).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Untimed passes over all files before timing, per configuration.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed passes over all files, per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Python interpreter with PIL and numpy.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Only our side (no PIL timing; the parity check still runs).
    #[arg(long)]
    no_pil: bool,
    /// Skip the parity check against PIL.
    #[arg(long)]
    no_check: bool,
    /// Check every file against PIL, not one of each size (prints one row
    /// per size: the worst file of that size).
    #[arg(long)]
    check_all: bool,
    /// Also time our stages (decode, resize, normalize) on one thread.
    #[arg(long)]
    stages: bool,
}

/// `(width, height, file)` of every benchmark image, from the manifest.
struct Set {
    files: Vec<(u32, u32, PathBuf)>,
    bytes: u64,
    sha256: String,
    bits_per_pixel: f64,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench_images_pil.py")
}

fn python(args: &Args) -> Command {
    let mut cmd = Command::new(&args.python);
    cmd.arg(script()).env("OMP_NUM_THREADS", "1").env("OPENBLAS_NUM_THREADS", "1").stderr(Stdio::inherit());
    cmd
}

fn run_python(args: &Args, what: &[&str]) -> Result<String> {
    let mut cmd = python(args);
    cmd.args(what);
    let out =
        cmd.output().with_context(|| format!("running {} {} {}", args.python, script().display(), what.join(" ")))?;
    ensure!(out.status.success(), "{} {} {} failed: {}", args.python, script().display(), what.join(" "), out.status);
    String::from_utf8(out.stdout).context("python output is not UTF-8")
}

fn make_set(args: &Args) -> Result<Set> {
    let dir = args.dir.to_str().context("--dir must be UTF-8")?;
    run_python(args, &["gen", "--dir", dir, "--count", &args.count.to_string(), "--seed", &args.seed.to_string()])?;
    let manifest = args.dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let m: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", manifest.display()))?;
    let mut files = Vec::new();
    for e in m["files"].as_array().context("manifest: no files")? {
        let (w, h) = (e["width"].as_u64().context("width")?, e["height"].as_u64().context("height")?);
        files.push((w as u32, h as u32, args.dir.join(e["file"].as_str().context("file")?)));
    }
    ensure!(files.len() == args.count, "manifest lists {} files, expected {}", files.len(), args.count);
    Ok(Set {
        files,
        bytes: m["total_bytes"].as_u64().unwrap_or(0),
        sha256: m["sha256"].as_str().unwrap_or("?").to_string(),
        bits_per_pixel: m["bits_per_pixel"].as_f64().unwrap_or(0.0),
    })
}

fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("building a rayon pool")
}

/// One pass of `load_image` over every file, images in parallel on `pool`
/// (the resize's own row parallelism runs in the same pool). Seconds.
fn our_pass(pool: &rayon::ThreadPool, paths: &[PathBuf], cfg: &ImageConfig) -> Result<f64> {
    let t0 = Instant::now();
    let firsts: Vec<f32> = pool.install(|| {
        paths
            .par_iter()
            .with_max_len(1)
            .map(|p| load_image(p, cfg).map(|v| std::hint::black_box(v)[0]))
            .collect::<Result<_, _>>()
    })?;
    let dt = t0.elapsed().as_secs_f64();
    std::hint::black_box(firsts);
    Ok(dt)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Timed passes of one configuration.
struct Timing {
    label: String,
    seconds: Vec<f64>,
    images: usize,
}

impl Timing {
    fn rate(&self) -> f64 {
        self.images as f64 / median(&self.seconds)
    }
    /// Slowest and fastest pass, images/s.
    fn range(&self) -> (f64, f64) {
        let max = self.seconds.iter().copied().fold(f64::MIN, f64::max);
        let min = self.seconds.iter().copied().fold(f64::MAX, f64::min);
        (self.images as f64 / max, self.images as f64 / min)
    }
    fn row(&self) -> String {
        let (lo, hi) = self.range();
        let passes: Vec<String> = self.seconds.iter().map(|s| format!("{s:.2}")).collect();
        format!(
            "| {} | {:.1} | {:.1} - {:.1} | {:.2} | {} |",
            self.label,
            self.rate(),
            lo,
            hi,
            1000.0 / self.rate(),
            passes.join(" ")
        )
    }
}

/// `bench_images_pil.py serve`: a Python process holding a pool of
/// `procs` PIL workers, timing one pass over every file per request.
struct PilServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Pillow, numpy and Python versions.
    versions: String,
}

impl PilServer {
    fn start(args: &Args, size: usize, procs: usize) -> Result<Self> {
        let dir = args.dir.to_str().context("--dir must be UTF-8")?;
        let mut cmd = python(args);
        cmd.args(["serve", "--dir", dir, "--size", &size.to_string(), "--procs", &procs.to_string()]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {} serve", args.python, script().display()))?;
        let stdin = child.stdin.take().context("PIL server stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("PIL server stdout")?);
        let mut server = PilServer { child, stdin, stdout, versions: String::new() };
        let ready = server.read()?;
        ensure!(ready["ready"].as_bool() == Some(true), "PIL server: unexpected greeting {ready}");
        let v = |k: &str| ready[k].as_str().unwrap_or("?").to_string();
        server.versions = format!("Pillow {}, numpy {}, Python {}", v("pillow"), v("numpy"), v("python"));
        Ok(server)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).context("reading from the PIL server")?;
        ensure!(n > 0, "the PIL server exited (see its error above)");
        serde_json::from_str(&line).with_context(|| format!("PIL server said: {line}"))
    }

    /// One timed pass over every file with `procs` processes: seconds.
    fn pass(&mut self, procs: usize) -> Result<f64> {
        writeln!(self.stdin, "{procs}").context("writing to the PIL server")?;
        self.stdin.flush().context("writing to the PIL server")?;
        let v = self.read()?;
        v["seconds"].as_f64().with_context(|| format!("PIL server said: {v}"))
    }
}

impl Drop for PilServer {
    fn drop(&mut self) {
        // Ends the server's command loop; it closes its pool and exits.
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// The parity check's worst values over the files of one size.
struct SizeParity {
    size: (u32, u32),
    files: usize,
    /// Max abs difference of the whole pipeline.
    max: f32,
    /// Mean abs difference of the whole pipeline.
    mean: f64,
    /// Share of values off by at least one level.
    off: f64,
    /// Max abs difference of our resize + normalize of PIL's decoded pixels.
    same_decoded_max: f32,
}

/// Our output vs PIL's, for the first file of each size (every file with
/// `--check-all`; one row per size, the worst file of it). Fails when our
/// resize + normalize of PIL's own decoded pixels is not PIL's output (up to
/// float rounding: the same work after decoding), or when the mean
/// difference of the whole pipeline is over the JPEG tolerance of the
/// fixtures in data/image.rs (0.75 level; zune-jpeg and libjpeg-turbo decode
/// a few values differently). The fixtures' max (5 levels, measured at 40 x
/// 40, where each output pixel averages many input pixels) is reported, with
/// a note where it is exceeded: at 768 the decoders' different chroma
/// upsampling in the last column (row) of an image whose width (height) is
/// not a multiple of the 16-pixel MCU shows through (on 7 of the 200
/// benchmark files, 6 to 20 levels on a few values).
fn check_parity(args: &Args, set: &Set, cfg: &ImageConfig) -> Result<()> {
    let mut picked: Vec<&(u32, u32, PathBuf)> = Vec::new();
    for f in &set.files {
        if args.check_all || !picked.iter().any(|p| (p.0, p.1) == (f.0, f.1)) {
            picked.push(f);
        }
    }
    let level = 1.0 / 127.5;
    let mut sizes: Vec<SizeParity> = Vec::new();
    let (mut failures, mut over_max) = (Vec::new(), Vec::new());
    let dir = args.dir.to_str().context("--dir must be UTF-8")?;
    let size = cfg.size.to_string();
    // PIL's outputs are 7 MB each at 768: a few files at a time.
    for batch in picked.chunks(8) {
        let out = tempfile::tempdir().context("temp dir for the parity check")?;
        let odir = out.path().to_str().context("temp dir must be UTF-8")?;
        let names: Vec<String> = batch
            .iter()
            .map(|f| f.2.file_name().and_then(|n| n.to_str()).map(str::to_string).context("file name"))
            .collect::<Result<_>>()?;
        let mut what = vec!["dump", "--dir", dir, "--out", odir, "--size", &size];
        what.extend(names.iter().map(String::as_str));
        run_python(args, &what)?;
        for ((w, h, path), name) in batch.iter().zip(&names) {
            let want = read_f32(&out.path().join(format!("{name}.f32")))?;
            let got = load_image(path, cfg).with_context(|| format!("load_image {}", path.display()))?;
            ensure!(got.len() == want.len(), "{name}: {} values, PIL gave {}", got.len(), want.len());
            let (max, mean, off) = compare_normalized(&got, &want);
            // Everything after decoding, on PIL's decoded pixels.
            let rgb = std::fs::read(out.path().join(format!("{name}.rgb"))).context("PIL's decoded pixels")?;
            let same = preprocess_rgb8(&rgb, *w as usize, *h as usize, cfg);
            let (smax, ..) = compare_normalized(&same, &want);
            // The fixtures' JPEG tolerance (data/image.rs), plus a little
            // slack for the float rounding of numpy's float32 arithmetic.
            if mean > 0.75 * level as f64 {
                failures.push(format!("{name}: mean {:.3} levels", mean / level as f64));
            }
            if max > 5.0 * level + 1e-6 {
                over_max.push(format!("{name} ({:.0} levels)", max / level));
            }
            if smax > 1e-6 {
                failures.push(format!("{name}: resize + normalize of PIL's pixels differs by {smax:e}"));
            }
            match sizes.iter_mut().find(|s| s.size == (*w, *h)) {
                Some(s) => {
                    s.files += 1;
                    s.max = s.max.max(max);
                    s.mean = s.mean.max(mean);
                    s.off = s.off.max(off);
                    s.same_decoded_max = s.same_decoded_max.max(smax);
                }
                None => sizes.push(SizeParity { size: (*w, *h), files: 1, max, mean, off, same_decoded_max: smax }),
            }
        }
    }
    println!("Parity with PIL ({} files; per size, the worst file):\n", picked.len());
    println!(
        "| size | files | max abs diff (levels) | mean abs diff (levels) | values off by >= 1 level \
         | same decoded pixels: max abs diff |"
    );
    println!("|---|---|---|---|---|---|");
    for s in &sizes {
        println!(
            "| {}x{} | {} | {:.2} | {:.3} | {:.1}% | {:.1e} |",
            s.size.0,
            s.size.1,
            s.files,
            s.max / level,
            s.mean / level as f64,
            s.off * 100.0,
            s.same_decoded_max
        );
    }
    println!();
    if !over_max.is_empty() {
        println!(
            "Note: over the fixtures' max of 5 levels (decoder differences at an image edge): {}\n",
            over_max.join(", ")
        );
    }
    if !failures.is_empty() {
        bail!("our output is not PIL's: {}", failures.join("; "));
    }
    Ok(())
}

fn stages(set: &Set, cfg: &ImageConfig, reps: usize) -> Result<()> {
    let pool = pool(1)?;
    let (mut dec, mut res, mut norm) = (Vec::new(), Vec::new(), Vec::new());
    pool.install(|| -> Result<()> {
        for _ in 0..reps.max(1) {
            // decode, resize, resize + normalize (preprocess_rgb8)
            let (mut d, mut r, mut n) = (0.0, 0.0, 0.0);
            for (_, _, p) in &set.files {
                let t0 = Instant::now();
                let (rgb, w, h) = decode_rgb8(p, cfg)?;
                let t1 = Instant::now();
                let resized = resize_rgb8(&rgb, w, h, cfg);
                let t2 = Instant::now();
                std::hint::black_box(&resized);
                let full = preprocess_rgb8(&rgb, w, h, cfg);
                let t3 = Instant::now();
                std::hint::black_box(&full);
                d += (t1 - t0).as_secs_f64();
                r += (t2 - t1).as_secs_f64();
                n += (t3 - t2).as_secs_f64();
            }
            dec.push(d);
            res.push(r);
            norm.push(n);
        }
        Ok(())
    })?;
    let per = |v: &[f64]| 1000.0 * median(v) / set.files.len() as f64;
    println!(
        "Our stages, 1 thread, ms per image (median of {reps} passes): decode {:.2}, resize {:.2}, \
         resize + normalize {:.2}\n",
        per(&dec),
        per(&res),
        per(&norm)
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.threads >= 1 && args.reps >= 1, "--threads and --reps must be at least 1");
    let model = ModelConfig::named_preset(&args.preset)?;
    let cfg = ImageConfig::new(model.s2.max_scale());
    let set = make_set(&args)?;
    let paths: Vec<PathBuf> = set.files.iter().map(|f| f.2.clone()).collect();
    let pixels: u64 = set.files.iter().map(|f| f.0 as u64 * f.1 as u64).sum();
    println!(
        "{} JPEGs in {} ({:.1} MB, {:.2} Mpixel mean, {:.2} bits/pixel, sha256 {}), preset {} -> {} x {} ({:?}), \
         warmup {}, reps {}\n",
        set.files.len(),
        args.dir.display(),
        set.bytes as f64 / 1e6,
        pixels as f64 / set.files.len() as f64 / 1e6,
        set.bits_per_pixel,
        &set.sha256[..set.sha256.len().min(12)],
        args.preset,
        cfg.size,
        cfg.size,
        cfg.mode,
        args.warmup,
        args.reps,
    );
    if !args.no_check {
        check_parity(&args, &set, &cfg)?;
    }
    if args.stages {
        stages(&set, &cfg, args.reps)?;
    }
    // Rounds of (ours 1 thread, PIL 1 process, ours N threads, PIL N
    // processes): the configurations alternate, so a busy moment on the
    // machine hits all of them alike. The first `warmup` rounds are not kept.
    let n = args.threads;
    let thread_counts: Vec<usize> = if n > 1 { vec![1, n] } else { vec![1] };
    let pools = thread_counts.iter().map(|&t| pool(t)).collect::<Result<Vec<_>>>()?;
    let mut server = if args.no_pil { None } else { Some(PilServer::start(&args, cfg.size, n)?) };
    let plural = |t: usize| if t == 1 { "" } else { "s" };
    let mut rows = Vec::new();
    for &t in &thread_counts {
        rows.push(Timing {
            label: format!("Tessera `load_image`, {t} thread{}", plural(t)),
            seconds: vec![],
            images: 0,
        });
        if server.is_some() {
            let label = if t == 1 {
                "PIL + numpy, 1 process".to_string()
            } else {
                format!("PIL + numpy, pool of {t} processes")
            };
            rows.push(Timing { label, seconds: vec![], images: 0 });
        }
    }
    for round in 0..args.warmup + args.reps {
        let mut times = Vec::new();
        for (&t, pool) in thread_counts.iter().zip(&pools) {
            times.push(our_pass(pool, &paths, &cfg)?);
            if let Some(server) = server.as_mut() {
                times.push(server.pass(t)?);
            }
        }
        if round >= args.warmup {
            for (row, dt) in rows.iter_mut().zip(times) {
                row.seconds.push(dt);
                row.images = paths.len();
            }
        }
    }
    let versions = server.as_ref().map(|s| s.versions.clone()).unwrap_or_default();
    drop(server);
    println!("| configuration | images/s (median) | slowest - fastest pass | ms/image | seconds per pass |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.row());
    }
    if !args.no_pil {
        println!("\n{versions}");
        let ratio = |a: usize, b: usize| rows[a].rate() / rows[b].rate();
        println!("ratio ours / PIL, 1 thread vs 1 process: {:.2}x", ratio(0, 1));
        if n > 1 {
            println!("ratio ours / PIL, {n} threads vs {n} processes: {:.2}x (target: at least 2x)", ratio(2, 3));
        }
    }
    Ok(())
}
