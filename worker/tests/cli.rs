//! The `worker` binary's own commands end to end. (Having an integration test
//! here also makes `cargo test --workspace` build the `worker` binary that the
//! root package's end-to-end tests run.)

use std::path::Path;
use std::process::Command;

fn worker(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().expect("spawn worker")
}

#[test]
fn fresh_tiny_model_starts_at_the_uniform_loss() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let out = worker(&["init-model", "--preset", "tiny", "--out", model.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in
        ["config.json", "vision_tower/model.safetensors", "mm_projector/model.safetensors", "llm/model.safetensors"]
    {
        assert!(model.join(f).exists(), "init-model wrote no {f}");
    }
    let batch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny/batch.safetensors");
    let grads = dir.path().join("grads.safetensors");
    let out = worker(&[
        "debug-step",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        batch.to_str().unwrap(),
        "--out",
        grads.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // "loss 5.54xxxx; gradients written to ..." — weights N(0, 0.02) give
    // nearly uniform logits, so the loss is close to ln(256) = 5.545.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let loss: f64 = stdout.split_whitespace().nth(1).and_then(|s| s.trim_end_matches(';').parse().ok()).unwrap();
    assert!((loss - 256f64.ln()).abs() < 0.05, "initial loss {loss}");
    assert!(grads.exists());
}

#[test]
fn unknown_preset_and_device_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = worker(&["init-model", "--preset", "huge", "--out", dir.path().join("m").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: unknown preset `huge`") && !err.contains("panicked"), "{err}");
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny");
    let out = worker(&[
        "debug-step",
        "--model",
        tiny.join("model").to_str().unwrap(),
        "--batch",
        tiny.join("batch.safetensors").to_str().unwrap(),
        "--out",
        dir.path().join("g.safetensors").to_str().unwrap(),
        "--device",
        "cuda:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda:0") && !err.contains("panicked"), "{err}");
    // The default build has no CUDA; the message says how to get it.
    if !cfg!(feature = "cuda") {
        assert!(err.contains("built without CUDA support") && err.contains("--features cuda"), "{err}");
    }
}

#[test]
fn demo_data_trains_and_evaluates_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = worker(&["make-demo-data", "--out", data.to_str().unwrap(), "--train", "64", "--eval", "8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A bad sample among the good ones: skipped, counted, never fatal.
    std::fs::write(data.join("images/train_00003.png"), b"not a png").unwrap();
    let d = data.display();
    let config = format!(
        r#"
[model]
preset = "tiny"
[train]
steps = 40
batch_size = 8
[optim.lr]
vision_tower = 3e-3
projector = 3e-3
llm = 3e-3
[data]
tokenizer = "{d}/tokenizer.json"
[[data.datasets]]
path = "{d}/train.jsonl"
image_folder = "{d}/images"
[[data.eval_datasets]]
path = "{d}/eval.jsonl"
image_folder = "{d}/images"
"#
    );
    let cfg = dir.path().join("job.toml");
    std::fs::write(&cfg, config).unwrap();
    let model = dir.path().join("model");
    let metrics = dir.path().join("run/metrics.jsonl");
    let out = worker(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        model.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    let losses: Vec<f64> = stdout
        .lines()
        .filter(|l| l.starts_with("step"))
        .filter_map(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        .collect();
    assert_eq!(losses.len(), 40, "{stdout}");
    // From ~ln(vocab) down to the answer prior: the model learns the task's format.
    assert!(losses[0] > 3.0 && losses[39] < 0.6 * losses[0], "losses {:?}", losses);
    // 64 samples, 40 steps of 8: five epochs, the bad one skipped each time.
    assert!(stdout.contains("bad samples skipped: 5"), "{stdout}");
    // The step metrics count the same bad samples, one JSON line per step.
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&metrics).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 40);
    assert_eq!(lines.iter().map(|m| m["bad_samples"].as_u64().unwrap()).sum::<u64>(), 5);
    assert!((lines[39]["loss"].as_f64().unwrap() - losses[39]).abs() < 1e-3);
    assert!(stdout.contains("eval: accuracy"), "{stdout}");
    let out = worker(&["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    let by_dir = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && by_dir.contains("/8)"), "{by_dir}");
    // The same split named by the job config gives the same numbers.
    let out = worker(&["eval", "--model", model.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), by_dir);
}

/// `check-ops` (what scripts/device-check.sh runs on a GPU) on the CPU:
/// f32 against f64, every op within 1e-5, the summary line printed.
#[test]
fn check_ops_on_the_cpu_passes() {
    let out = worker(&["check-ops", "--device", "cpu"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout.lines().last().unwrap_or_default();
    let passed: Vec<usize> = summary.split_whitespace().filter_map(|w| w.parse().ok()).take(2).collect();
    assert!(passed.len() == 2 && passed[0] == passed[1] && passed[0] > 60, "{summary}");
    assert!(stdout.contains("attention_bwd (causal true, seq 300) dk") && stdout.contains("ok"), "{stdout}");
}

/// `bench-step` with fewer layers reports the shape, the model FLOPs of the
/// step (for MFU) and its times; a GPU this build cannot use is refused.
#[test]
fn bench_step_reports_flops_and_the_shape() {
    let args = ["bench-step", "--preset", "tiny", "--vit-layers", "2", "--llm-layers", "1", "--batch", "2"];
    let out = worker(&[&args[..], &["--seq", "8", "--warmup", "0", "--steps", "2"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (j["vit_layers"].as_u64(), j["llm_layers"].as_u64(), j["device"].as_str()),
        (Some(2), Some(1), Some("cpu"))
    );
    assert!(j["model_flops_per_step"].as_f64().unwrap() > 1e6, "{j}");
    assert_eq!(j["step_s_all"].as_array().map(Vec::len), Some(2));
    if !cfg!(feature = "cuda") {
        let out = worker(&["bench-step", "--preset", "tiny", "--device", "cuda:0"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features cuda"));
    }
}

/// `plan-memory` on a job config: a table, the largest micro-batch and one
/// JSON line; a micro-batch over the budget exits non-zero with the JSON
/// still printed; recomputing everything fits more samples.
#[test]
fn plan_memory_prints_the_plan_and_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("job.toml");
    let write = |recompute: &str| {
        let toml = format!(
            "[model]\npreset = \"small\"\nrecompute = \"{recompute}\"\n[train]\nsteps = 1\nbatch_size = 16\ntext_tokens = 256\nprecision = \"bf16\"\n"
        );
        std::fs::write(&config, toml).unwrap();
    };
    let json = |out: &std::process::Output| -> serde_json::Value {
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let plan = |gib: &str| {
        worker(&["plan-memory", "--config", config.to_str().unwrap(), "--world-size", "2", "--gpu-gib", gib])
    };
    write("none");
    let out = plan("80");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for part in [
        "micro-batch 8",
        "AdamW m and v",
        "compute copies",
        "ViT, 40 tiles",
        "LLM, 8 x 319 tokens",
        "attention scratch",
    ] {
        assert!(stdout.contains(part), "no `{part}` in\n{stdout}");
    }
    let fits = json(&out);
    assert_eq!(fits["fits"], true);
    let (peak, max) = (fits["peak_gib"].as_f64().unwrap(), fits["max_micro_batch"].as_u64().unwrap());
    assert!(peak > 0.5 && max > 8, "{fits}");
    // A budget just under the plan's peak refuses the job.
    let out = plan(&format!("{}", peak * 0.99));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not fit"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["fits"], false);
    write("all");
    let all = json(&plan("80"));
    assert!(all["max_micro_batch"].as_u64().unwrap() > max, "recompute all: {all}, none: {fits}");
}
