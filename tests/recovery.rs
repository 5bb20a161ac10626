//! End-to-end tests of failure recovery within a job: a real coordinator and
//! real workers on 127.0.0.1, one of them SIGKILLed at a step that varies
//! from run to run. The job must finish, and (keeping its world size) with
//! the bits of a run that was never interrupted.

mod common;

use common::cluster::*;
use common::committed_checkpoints;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

const STEPS: u64 = 14;

/// The demo data and the final weights of the uninterrupted 2-worker job,
/// made once for every test in this file.
struct Reference {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    weights: BTreeMap<String, Vec<f32>>,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        make_data(&data);
        let (cfg, _) = job(tmp.path(), &data, "reference", "");
        run_job(&cfg, 2, &tmp.path().join("out"));
        let weights = load_model(&tmp.path().join("out/model"));
        Reference { _tmp: tmp, data, weights }
    })
}

/// A 2-worker job checkpointing every 2 steps; `extra` goes into `[cluster]`.
fn job(dir: &Path, data: &Path, name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let ck = dir.join(format!("ck-{name}"));
    let toml = config(data, STEPS, 5, 2, 2, extra, "")
        + &format!("[checkpoint]\ndir = \"{}\"\nevery = 2\nkeep = 2\n", ck.display());
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, toml).unwrap();
    (cfg, ck)
}

/// Waits until a checkpoint has committed and then 0 to 3 more steps (the
/// clock picks), so the kill lands at a different step from run to run.
fn wait_for_a_kill_point(ck: &Path, out: &Path) -> usize {
    let start = Instant::now();
    while committed_checkpoints(ck).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    let extra = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().subsec_nanos() as usize % 4;
    let target = metrics_lines(out) + extra;
    while metrics_lines(out) < target.min(STEPS as usize - 3) {
        assert!(start.elapsed() < Duration::from_secs(120), "the job stopped making progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    metrics_lines(out)
}

/// Starts the job on 2 workers and SIGKILLs rank 1 at a kill point;
/// returns the coordinator and rank 0.
fn start_and_kill_rank_1(cfg: &Path, ck: &Path, out: &Path, port: u16) -> (Child, Child) {
    let c = coordinator(cfg, port, out);
    let w0 = worker(&["--rank", "0"], port);
    let mut w1 = worker(&["--rank", "1"], port);
    let at = wait_for_a_kill_point(ck, out);
    w1.kill().unwrap(); // SIGKILL
    w1.wait().unwrap();
    println!("killed rank 1 after {at} steps");
    (c, w0)
}

fn assert_succeeds(child: Child, what: &str) -> String {
    let o = wait(child, Duration::from_secs(240), what);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{what} failed: {stderr}");
    stderr
}

/// The metrics read as one run: every step once, each with the global batch.
fn assert_one_run(out: &Path) -> Vec<serde_json::Value> {
    let m = metrics(out);
    let steps: Vec<u64> = m.iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (0..STEPS).collect::<Vec<_>>(), "{m:?}");
    for s in &m {
        assert_eq!(s["samples"], 10, "the global batch is kept: {s}");
    }
    m
}

/// SIGKILL one of two workers; its replacement (`worker --rank 1`, started
/// at once, as a cluster's requeue would) takes its rank in the next
/// generation, the survivor rejoins, both resume from the last committed
/// checkpoint, and the job ends with the uninterrupted job's bits.
#[test]
fn a_killed_worker_is_replaced_and_the_job_ends_with_the_same_bits() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, ck) = job(tmp.path(), &r.data, "replaced", "max_restarts = 2");
    let out = tmp.path().join("out");
    let port = free_port();
    let (c, w0) = start_and_kill_rank_1(&cfg, &ck, &out, port);
    let replacement = worker(&["--rank", "1"], port);
    assert_succeeds(w0, "the surviving worker");
    assert_succeeds(replacement, "the replacement worker");
    let log = assert_succeeds(c, "the coordinator");
    assert!(log.contains("recovering"), "{log}");
    assert_one_run(&out);
    assert!(
        load_model(&out.join("model")) == r.weights,
        "the recovered job's weights differ from the uninterrupted job's"
    );
}

/// SIGKILL rank 1 while the ranks write their parts of the second
/// checkpoint (its staging directory exists, and it never commits): the
/// replacement and the survivor resume from the first checkpoint, the
/// unfinished write is cleared by a later commit, and the job ends with the
/// uninterrupted job's bits. The kill must land inside the write; a few
/// tries make that near certain.
#[test]
fn a_worker_killed_during_a_checkpoint_write_resumes_from_the_previous_one() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    for attempt in 0..10 {
        let (cfg, ck) = job(tmp.path(), &r.data, &format!("in-write-{attempt}"), "max_restarts = 2");
        let out = tmp.path().join(format!("out-{attempt}"));
        let port = free_port();
        let mut c = coordinator(&cfg, port, &out);
        let mut w0 = worker(&["--rank", "0"], port);
        let mut w1 = worker(&["--rank", "1"], port);
        // The second checkpoint's staging directory, of the first generation.
        let writing = ck.join(".step-00000004.g1.staging");
        let start = Instant::now();
        while !writing.exists() && start.elapsed() < Duration::from_secs(120) {
            std::thread::yield_now();
        }
        w1.kill().unwrap(); // SIGKILL
        w1.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        if committed_checkpoints(&ck) != ["step-00000002"] {
            // Rank 1 had reported its part: the checkpoint committed. Again.
            for p in [&mut c, &mut w0] {
                let _ = p.kill();
                let _ = p.wait();
            }
            continue;
        }
        println!("the kill landed in the checkpoint write on attempt {}", attempt + 1);
        let replacement = worker(&["--rank", "1"], port);
        assert_succeeds(w0, "the surviving worker");
        assert_succeeds(replacement, "the replacement worker");
        let log = assert_succeeds(c, "the coordinator");
        assert!(log.contains("recovering") && log.contains("resume_step=2"), "{log}");
        assert!(!writing.exists(), "a later commit cleared the unfinished write");
        assert_one_run(&out);
        assert!(
            load_model(&out.join("model")) == r.weights,
            "the recovered job's weights differ from the uninterrupted job's"
        );
        return;
    }
    panic!("10 kills all missed the checkpoint write");
}

/// SIGKILL the coordinator and start it again on the same state directory:
/// the workers keep trying to reach it, rejoin its next generation, resume
/// from the last committed checkpoint, and the job ends with the same bits.
#[test]
fn a_killed_coordinator_is_started_again_and_the_job_ends_with_the_same_bits() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, ck) = job(tmp.path(), &r.data, "coordinator", "");
    let out = tmp.path().join("out");
    let port = free_port();
    let mut c = coordinator(&cfg, port, &out);
    let workers: Vec<Child> = (0..2).map(|r| worker(&["--rank", &r.to_string()], port)).collect();
    let at = wait_for_a_kill_point(&ck, &out);
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    println!("killed the coordinator after {at} steps");
    std::thread::sleep(Duration::from_millis(500));
    let c = coordinator(&cfg, port, &out);
    for (rank, w) in workers.into_iter().enumerate() {
        let log = assert_succeeds(w, &format!("worker {rank}"));
        assert!(log.contains("joined the next generation"), "{log}");
    }
    let log = assert_succeeds(c, "the restarted coordinator");
    assert!(log.contains("the coordinator restarted on a job in progress"), "{log}");
    assert_one_run(&out);
    assert!(
        load_model(&out.join("model")) == r.weights,
        "the resumed job's weights differ from the uninterrupted job's"
    );
}

/// An elastic job that loses one of two workers and gets no replacement
/// goes on with one after `elastic_timeout_s`, with the same global batch;
/// the result matches the uninterrupted job to data-parallel tolerance.
#[test]
fn an_elastic_job_finishes_on_fewer_ranks() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let extra = "max_restarts = 2\nelastic = true\nelastic_timeout_s = 2";
    let (cfg, ck) = job(tmp.path(), &r.data, "elastic", extra);
    let out = tmp.path().join("out");
    let port = free_port();
    let (c, w0) = start_and_kill_rank_1(&cfg, &ck, &out, port);
    assert_succeeds(w0, "the surviving worker");
    let log = assert_succeeds(c, "the coordinator");
    assert!(log.contains("going on with fewer ranks"), "{log}");
    let m = assert_one_run(&out);
    let last = m.last().unwrap();
    assert_eq!(last["rank_samples"].as_array().unwrap().len(), 1, "the last step ran on one rank: {last}");
    let (worst, name) = worst_relative_error(&r.weights, &load_model(&out.join("model")));
    assert!(worst < 1e-5, "{name} differs by {worst:e}");
}
