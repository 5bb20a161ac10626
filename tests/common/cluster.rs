//! Helpers for the end-to-end tests of multi-worker jobs: demo data, job
//! configs, and a real coordinator and real workers as child processes.

use super::bin;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A small demo dataset plus a text-only dataset of long prompts made from
/// its questions, so a step mixes samples of very different cost.
pub fn make_data(dir: &Path) {
    let out = Command::new(bin("worker"))
        .args(["make-demo-data", "--out", dir.to_str().unwrap(), "--train", "48", "--eval", "6"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let train = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    let text: Vec<String> = train
        .lines()
        .take(24)
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("image");
            let id = format!("text-{}", o["id"].as_str().unwrap());
            o.insert("id".into(), id.into());
            let q = o["conversations"][0]["value"].as_str().unwrap().replace("<image>\n", "");
            let q = vec![q; 30].join(" ");
            o.get_mut("conversations").unwrap()[0]["value"] = q.into();
            v.to_string()
        })
        .collect();
    std::fs::write(dir.join("text.jsonl"), text.join("\n") + "\n").unwrap();
}

/// A job on `data`; `extra` goes into `[cluster]`, `data_extra` into `[data]`.
pub fn config(
    data: &Path,
    steps: u64,
    batch: usize,
    accum: usize,
    world: usize,
    extra: &str,
    data_extra: &str,
) -> String {
    let d = data.display();
    format!(
        r#"
[model]
preset = "tiny"
[train]
steps = {steps}
batch_size = {batch}
grad_accum = {accum}
seed = 3
warmup_ratio = 0.0
[optim]
weight_decay = 0.0
max_grad_norm = 1.0
eps = 1e-6
[optim.lr]
vision_tower = 1e-3
projector = 1e-3
llm = 1e-3
[data]
tokenizer = "{d}/tokenizer.json"
prefetch = 2
{data_extra}
[[data.datasets]]
path = "{d}/train.jsonl"
image_folder = "{d}/images"
[[data.datasets]]
path = "{d}/text.jsonl"
image_folder = "{d}/images"
[[data.eval_datasets]]
path = "{d}/eval.jsonl"
image_folder = "{d}/images"
[cluster]
world_size = {world}
heartbeat_interval_s = 0.5
{extra}
"#
    )
}

/// Waits for a child with a deadline (a hung job fails the test instead of CI).
pub fn wait(mut child: Child, limit: Duration, what: &str) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{what} did not finish in {limit:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn coordinator(config: &Path, port: u16, out: &Path) -> Child {
    Command::new(bin("coordinator"))
        .args(["--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub fn worker(args: &[&str], port: u16) -> Child {
    Command::new(bin("worker"))
        .args(args)
        .args(["--coordinator", &format!("http://127.0.0.1:{port}"), "--connect-timeout", "30"])
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs a whole job on `world` workers; returns the coordinator's stdout.
pub fn run_job(cfg: &Path, world: usize, out: &Path) -> String {
    let port = free_port();
    let c = coordinator(cfg, port, out);
    let workers: Vec<Child> = (0..world).map(|r| worker(&["--rank", &r.to_string()], port)).collect();
    for (r, w) in workers.into_iter().enumerate() {
        let o = wait(w, Duration::from_secs(240), "worker");
        assert!(o.status.success(), "worker {r} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = wait(c, Duration::from_secs(60), "coordinator");
    assert!(o.status.success(), "coordinator failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn load_model(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let mut all = BTreeMap::new();
    for module in ["vision_tower", "mm_projector", "llm"] {
        let bytes = std::fs::read(dir.join(module).join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            assert_eq!(t.dtype(), safetensors::Dtype::F32);
            let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            all.insert(format!("{module}.{name}"), v);
        }
    }
    all
}

/// The worst per-tensor relative error ||a - b|| / ||a||, where an RMS
/// below 1e-3 (the init scale is 0.02) counts as 1e-3: a tensor can hold
/// only rounding noise, such as the attention key bias, whose gradient is
/// zero in exact arithmetic (softmax ignores a shift), and that noise
/// depends on the summation order. AdamW's m / sqrt(v) turns such noise
/// into steps of up to lr; `eps = 1e-6` in the test config keeps it small
/// (with the default 1e-8 the worst tensor, a key bias, differs by 1.4e-5,
/// every other tensor by under 2e-6). Set SHOW_ERRORS=1 to print every tensor.
pub fn worst_relative_error(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> (f64, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = (0.0, String::new());
    for (k, x) in a {
        let y = &b[k];
        let diff: f64 = x.iter().zip(y).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>().sqrt();
        let floor = 1e-3 * (x.len() as f64).sqrt();
        let norm: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt().max(floor);
        if std::env::var("SHOW_ERRORS").is_ok() {
            eprintln!("{k}: {:e} (norm {norm:e})", diff / norm);
        }
        if diff / norm > worst.0 {
            worst = (diff / norm, k.clone());
        }
    }
    worst
}

pub fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn metrics_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

pub fn stderr_of(mut child: Child) -> String {
    let mut s = String::new();
    child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    let _ = child.wait();
    s
}
