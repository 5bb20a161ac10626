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
}
