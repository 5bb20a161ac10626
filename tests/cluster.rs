//! End-to-end tests of multi-worker training: a real coordinator process and
//! real worker processes talking gRPC and the TCP ring on 127.0.0.1.

mod common;

use common::cluster::*;
use common::{bin, committed_checkpoints};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Data-parallel equivalence: 2 workers with global batch B give, after K
/// steps, the parameters 1 worker gets with the same global batch, within
/// 1e-5 relative, although cost balancing gives the ranks different sample
/// counts. And 1 worker under the coordinator is bit-identical to `worker
/// train` in one process: the same samples, the same micro-batches.
#[test]
fn two_workers_train_the_same_model_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let m = data_parallel_equivalence(tmp.path(), &data, "");
    for s in &m {
        assert_eq!(s["tiles"].as_u64().unwrap() % 5, 0, "static S2: 5 tiles per image");
    }
}

/// The same with dynamic S2 on wide and tall images: each gets its own tile
/// grid (6 or 7 tiles instead of 5), so the ranks' ViT costs differ by more
/// than their sample counts, and the gradients still sum to one model.
#[test]
fn two_workers_train_the_same_model_as_one_with_dynamic_s2() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    for i in 0..24u32 {
        let (w, h) = if i % 2 == 0 { (100, 20) } else { (20, 120) };
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5 + i) as u8, (y * 3) as u8, ((x ^ y) * 9) as u8]));
        img.save(data.join(format!("images/train_{i:05}.png"))).unwrap();
    }
    let m = data_parallel_equivalence(tmp.path(), &data, "image_aspect_ratio = \"dynamic_s2\"\nmax_tiles = 6");
    assert!(m.iter().any(|s| s["tiles"].as_u64().unwrap() % 5 != 0), "dynamic grids change the tile count: {m:?}");
}

/// Trains the job on 1 and on 2 workers and checks the models agree; returns
/// the 2-worker run's step metrics.
fn data_parallel_equivalence(tmp: &Path, data: &Path, data_extra: &str) -> Vec<serde_json::Value> {
    let (steps, batch, accum) = (4, 5, 2);
    let mut models = Vec::new();
    let mut last_metrics = Vec::new();
    for world in [1, 2] {
        let cfg = tmp.join(format!("w{world}.toml"));
        std::fs::write(&cfg, config(data, steps, batch, accum, world, "", data_extra)).unwrap();
        let out = tmp.join(format!("run{world}"));
        let stdout = run_job(&cfg, world, &out);
        assert!(stdout.contains("eval: accuracy"), "rank 0 evaluates and the coordinator prints it: {stdout}");
        let m = metrics(&out);
        assert_eq!(m.len(), steps as usize);
        for s in &m {
            assert_eq!(s["samples"], (batch * accum) as u64, "every sample of the global batch is trained");
        }
        if world == 2 {
            let uneven = m.iter().any(|s| s["rank_samples"][0] != s["rank_samples"][1]);
            assert!(uneven, "cost balancing should split some step unevenly: {m:?}");
        }
        assert!(out.join("loss_curve.svg").exists());
        models.push(load_model(&out.join("model")));
        last_metrics = m;
    }
    let (err, name) = worst_relative_error(&models[0], &models[1]);
    assert!(err < 1e-5, "2 workers differ from 1 by {err:e} (relative) in {name}");
    let start = load_model(&{
        let d = tmp.join("init");
        let o = Command::new(bin("worker"))
            .args(["init-model", "--preset", "tiny", "--seed", "3", "--out", d.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success());
        d
    });
    let (moved, _) = worst_relative_error(&start, &models[1]);
    assert!(moved > 1e-3, "training must move the weights for the comparison to mean anything ({moved:e})");

    let single = tmp.join("single");
    let o = Command::new(bin("worker"))
        .args(["train", "--config", tmp.join("w1.toml").to_str().unwrap()])
        .args(["--out", single.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(worst_relative_error(&models[0], &load_model(&single)).0, 0.0, "1 worker must equal `worker train`");
    last_metrics
}

/// A multi-worker job (coordinator and both workers) killed with SIGKILL
/// once a checkpoint has committed, then started again with the same
/// command, resumes from the checkpoint and ends with the same bits as the
/// job never interrupted; the coordinator's metrics go on where they were.
/// Resumed on 1 worker instead, it keeps the global batch and trains the
/// same model to within the data-parallel tolerance.
#[test]
fn a_killed_job_resumes_from_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let steps = 12;
    let job = |name: &str, world: usize| {
        let ck = tmp.path().join(format!("ck-{name}"));
        let toml = config(&data, steps, 5, 2, world, "", "")
            + &format!("[checkpoint]\ndir = \"{}\"\nevery = 2\nkeep = 2\n", ck.display());
        let cfg = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        (cfg, ck)
    };
    let (reference, _) = job("reference", 2);
    run_job(&reference, 2, &tmp.path().join("out-reference"));
    let want = load_model(&tmp.path().join("out-reference/model"));

    for resume_world in [2, 1] {
        let (cfg, ck) = job(&format!("killed-{resume_world}"), 2);
        let out = tmp.path().join(format!("out-killed-{resume_world}"));
        let port = free_port();
        let mut procs = vec![coordinator(&cfg, port, &out)];
        procs.extend((0..2).map(|r| worker(&["--rank", &r.to_string()], port)));
        let start = Instant::now();
        while committed_checkpoints(&ck).is_empty() {
            assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
            std::thread::sleep(Duration::from_millis(2));
        }
        for p in &mut procs {
            p.kill().unwrap(); // SIGKILL
        }
        for mut p in procs {
            p.wait().unwrap();
        }
        assert!(!out.join("model").exists(), "the job ended before the kill");

        let cfg = if resume_world == 2 {
            cfg
        } else {
            let one = tmp.path().join("killed-1-on-1.toml");
            let text = std::fs::read_to_string(&cfg).unwrap().replace("world_size = 2", "world_size = 1");
            std::fs::write(&one, text).unwrap();
            one
        };
        run_job(&cfg, resume_world, &out);
        // The steps after the checkpoint were trained again; the metrics
        // read as one run, each step once.
        let m = metrics(&out);
        let logged: Vec<u64> = m.iter().map(|s| s["step"].as_u64().unwrap()).collect();
        assert_eq!(logged, (0..steps).collect::<Vec<_>>(), "{m:?}");
        for s in &m {
            assert_eq!(s["samples"], 10, "the global batch is kept");
        }
        let got = load_model(&out.join("model"));
        if resume_world == 2 {
            assert!(got == want, "resumed on 2 workers, the weights differ from the uninterrupted job's");
        } else {
            let (worst, name) = worst_relative_error(&want, &got);
            assert!(worst < 1e-5, "resumed on 1 worker: {name} differs by {worst:e}");
        }
    }
}

/// SIGTERM to one worker of a 2-worker job (a preemption): both ranks learn
/// it at the same step's first all-reduce, neither trains that step, rank 0
/// checkpoints what is done, and the job stops with the reason. Started
/// again, it resumes there and ends with the bits of an uninterrupted job.
#[test]
fn sigterm_stops_every_rank_at_one_step_with_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let steps = 30;
    let job = |name: &str| {
        let ck = tmp.path().join(format!("ck-{name}"));
        let toml = config(&data, steps, 5, 2, 2, "", "")
            + &format!("[checkpoint]\ndir = \"{}\"\nevery = 1000\n", ck.display());
        let cfg = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        (cfg, ck)
    };
    let (reference, _) = job("reference");
    run_job(&reference, 2, &tmp.path().join("out-reference"));

    let (cfg, ck) = job("term");
    let out = tmp.path().join("out-term");
    let port = free_port();
    let c = coordinator(&cfg, port, &out);
    let workers: Vec<Child> = (0..2).map(|r| worker(&["--rank", &r.to_string()], port)).collect();
    let start = Instant::now();
    while metrics_lines(&out) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "the job did not start training");
        std::thread::sleep(Duration::from_millis(5));
    }
    let term = Command::new("kill").args(["-TERM", &workers[1].id().to_string()]).status().unwrap();
    assert!(term.success());
    let errors: Vec<String> = workers
        .into_iter()
        .map(|w| {
            let o = wait(w, Duration::from_secs(60), "worker");
            assert!(!o.status.success());
            String::from_utf8_lossy(&o.stderr).into_owned()
        })
        .collect();
    assert!(errors[1].contains("stopped by a signal after step"), "{}", errors[1]);
    for e in &errors {
        assert!(e.contains("checkpoint of step") && e.contains("start the job again"), "{e}");
    }
    let c = wait(c, Duration::from_secs(60), "coordinator");
    assert!(!c.status.success(), "the job did not finish: the coordinator says so");
    let left = committed_checkpoints(&ck);
    assert_eq!(left.len(), 1, "only the stop's checkpoint: {left:?}");
    let step: u64 = left[0].trim_start_matches("step-").parse().unwrap();
    assert!(errors[1].contains(&format!("after step {step} of {steps}")), "{}", errors[1]);
    assert!((3..steps).contains(&step), "{left:?}");

    run_job(&cfg, 2, &out);
    assert!(
        load_model(&out.join("model")) == load_model(&tmp.path().join("out-reference/model")),
        "the resumed job's weights differ from the uninterrupted job's"
    );
}

/// A worker killed with SIGKILL (alone in its job, so no ring peer sees it
/// first) is declared dead by the coordinator within the heartbeat
/// deadline plus one heartbeat interval, and the job fails naming it.
/// Prints the measured delay (docs/BENCHMARKS.md).
#[test]
fn a_dead_worker_is_declared_within_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let (interval, missed) = (0.5, 4.0);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, 100_000, 2, 1, 1, "max_restarts = 0", "")).unwrap();
    let port = free_port();
    let mut c = Command::new(bin("coordinator"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--out", tmp.path().join("out").to_str().unwrap(), "--missed-heartbeats", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Coordinator log lines with the time each arrived.
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = c.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    let mut w = worker(&["--rank", "0"], port);
    let out = tmp.path().join("out");
    let start = Instant::now();
    while metrics_lines(&out) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "the job did not start training");
        std::thread::sleep(Duration::from_millis(10));
    }
    w.kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    w.wait().unwrap();
    let declared = loop {
        let (at, line) = lines.recv_timeout(Duration::from_secs(30)).expect("the coordinator never declared the death");
        if line.contains("worker declared dead") {
            break at;
        }
    };
    let delay = declared.duration_since(killed).as_secs_f64();
    let limit = interval * missed + interval;
    println!("death declared {delay:.3} s after SIGKILL (deadline {:.1} s + interval {interval} s)", interval * missed);
    assert!(delay <= limit, "declared {delay:.3} s after the kill, limit {limit} s");
    let o = wait(c, Duration::from_secs(30), "coordinator");
    assert!(!o.status.success());
}

/// Wrong ranks are refused by name; a job whose workers never all join
/// fails after its join timeout with the missing ranks, and the worker that
/// did join is told to stop.
#[test]
fn refuses_bad_ranks_and_gives_up_on_missing_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, 2, 4, 1, 2, "join_timeout_s = 6", "")).unwrap();
    let port = free_port();
    let c = coordinator(&cfg, port, &tmp.path().join("out"));

    let out_of_range = wait(worker(&["--rank", "2"], port), Duration::from_secs(60), "worker");
    let e = String::from_utf8_lossy(&out_of_range.stderr);
    assert!(!out_of_range.status.success() && !e.contains("panicked"), "{e}");
    assert!(e.contains("rank 2 is out of range") && e.contains("world_size 2"), "{e}");

    let first = worker(&["--rank", "0"], port);
    std::thread::sleep(Duration::from_millis(1500));
    let dup = wait(worker(&["--rank", "0"], port), Duration::from_secs(60), "worker");
    let e = String::from_utf8_lossy(&dup.stderr);
    assert!(!dup.status.success() && e.contains("rank 0 is already taken"), "{e}");

    let c = wait(c, Duration::from_secs(60), "coordinator");
    let e = String::from_utf8_lossy(&c.stderr);
    assert!(!c.status.success(), "{e}");
    assert!(e.contains("only 1 of 2 workers joined within cluster.join_timeout_s = 6 s; missing ranks: [1]"), "{e}");
    let e = stderr_of(first);
    assert!(e.contains("the job failed") && !e.contains("panicked"), "{e}");
}

/// A worker whose coordinator never comes up retries, then says so.
#[test]
fn a_coordinator_that_never_comes_up_is_a_clear_error() {
    let port = free_port();
    let t = Instant::now();
    let o = Command::new(bin("worker"))
        .args(["--rank", "0", "--coordinator", &format!("http://127.0.0.1:{port}"), "--connect-timeout", "2"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !e.contains("panicked"), "{e}");
    let last = e.lines().last().unwrap_or("");
    assert!(last.starts_with("error: cannot reach the coordinator at http://127.0.0.1:"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(20), "gave up after {:?}", t.elapsed());
}

/// A worker speaking another protocol version is refused with the reason.
#[test]
fn another_protocol_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, 2, 4, 1, 1, "join_timeout_s = 30", "")).unwrap();
    let port = free_port();
    let mut c = coordinator(&cfg, port, &tmp.path().join("out"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let status = rt.block_on(async {
        let url = format!("http://127.0.0.1:{port}");
        let mut client = None;
        for _ in 0..100 {
            if let Ok(cl) = tessera_proto::CoordinatorClient::connect(url.clone()).await {
                client = Some(cl);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut client = client.expect("coordinator came up");
        let req = tessera_proto::v1::JoinRequest {
            protocol_version: tessera_proto::PROTOCOL_VERSION + 98,
            host: "h".into(),
            device: "cpu".into(),
            collective_addr: "h:1".into(),
            ..Default::default()
        };
        client.join(req).await.unwrap_err()
    });
    let _ = c.kill();
    let _ = c.wait();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let want = format!("worker speaks protocol v{}", tessera_proto::PROTOCOL_VERSION + 98);
    assert!(status.message().contains(&want), "{}", status.message());
}
