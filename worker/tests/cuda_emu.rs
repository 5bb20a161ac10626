//! The CUDA backend on the emulated device (`--device cuda-emu`, built with
//! `--features cuda-emu`): every kernel source runs on the CPU under the
//! real backend code. CI runs these; a build without the feature has none.
#![cfg(feature = "cuda-emu")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tessera_worker::engine::backend::Backend;
use tessera_worker::engine::cuda::{Cuda, MathMode};
use tessera_worker::model::weights::load_weights;
use tessera_worker::model::ModelConfig;

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker")).args(args).output().expect("spawn worker")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every op of the backend, on the emulated device against the CPU in f64,
/// with the limits a GPU gets, in each math mode.
#[test]
fn check_ops_passes_in_f32_tf32_and_bf16() {
    for precision in ["f32", "tf32", "bf16"] {
        let o = worker(&["check-ops", "--device", "cuda-emu", "--precision", precision]);
        let out = text(&o);
        assert!(o.status.success(), "{precision}: {out}");
        let line = out.lines().find(|l| l.contains("checks passed on cuda-emu")).unwrap_or_default();
        let (passed, total) = line.split_once(" of ").map(|(p, rest)| (p, rest.split(' ').next())).unwrap_or_default();
        assert_eq!(Some(passed), total, "{precision}: {line}");
        assert!(passed.parse::<usize>().is_ok_and(|n| n > 60), "{precision}: {line}");
    }
}

/// The PyTorch/transformers reference step (static and dynamic S2) on the
/// emulated device: loss within 1e-5, every gradient within 1e-4.
#[test]
fn debug_step_matches_the_pytorch_fixtures() {
    let fixtures = root().join("tests/fixtures/tiny");
    let dir = tempfile::tempdir().unwrap();
    for (batch, expect) in [("batch", "expected_grads"), ("batch_dynamic", "expected_grads_dynamic")] {
        let out = dir.path().join(format!("{batch}-grads.safetensors"));
        let o = worker(&[
            "debug-step",
            "--device",
            "cuda-emu",
            "--model",
            fixtures.join("model").to_str().unwrap(),
            "--batch",
            fixtures.join(format!("{batch}.safetensors")).to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--expect",
            fixtures.join(format!("{expect}.safetensors")).to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{batch}: {}", text(&o));
        assert!(text(&o).contains("worst"), "{}", text(&o));
    }
}

fn train(device: &str, config: &Path, dir: &Path) -> (Vec<f64>, BTreeMap<String, Vec<f32>>) {
    let out = dir.join(format!("model-{device}"));
    let metrics = dir.join(format!("metrics-{device}.jsonl"));
    let o = worker(&[
        "train",
        "--device",
        device,
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{device}: {}", text(&o));
    let losses = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect();
    let cfg = ModelConfig::named_preset("tiny").unwrap();
    (losses, load_weights(&out, &cfg).unwrap().into_iter().collect())
}

/// `worker train --device cuda-emu --config configs/tiny.toml` (TF32 GEMMs,
/// the default precision) runs to the end, learns, and repeats bit for bit.
#[test]
fn tiny_training_runs_to_the_end_and_repeats_bitwise() {
    let config = root().join("configs/tiny.toml");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (loss_a, weights_a) = train("cuda-emu", &config, a.path());
    let (loss_b, weights_b) = train("cuda-emu", &config, b.path());
    assert_eq!(loss_a.len(), 60);
    assert!(loss_a[59] < 0.5 * loss_a[0], "the run did not learn: {loss_a:?}");
    let bits = |l: &[f64]| l.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&loss_a), bits(&loss_b));
    assert!(weights_a == weights_b, "two runs on the emulated device trained different weights");
}

/// The same job in f32 stays within 1e-4 of the CPU backend: the loss at
/// every step and every trained weight (relative to the tensor's largest).
#[test]
fn tiny_training_in_f32_follows_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = std::fs::read_to_string(root().join("configs/tiny.toml")).unwrap();
    assert!(!tiny.contains("precision"), "configs/tiny.toml sets a precision; this test sets f32 itself");
    let config = dir.path().join("tiny-f32.toml");
    std::fs::write(&config, tiny.replace("[train]\n", "[train]\nprecision = \"f32\"\n")).unwrap();
    let (loss_emu, weights_emu) = train("cuda-emu", &config, dir.path());
    let (loss_cpu, weights_cpu) = train("cpu", &config, dir.path());
    assert_eq!(loss_emu.len(), loss_cpu.len());
    for (step, (a, c)) in loss_emu.iter().zip(&loss_cpu).enumerate() {
        assert!((a - c).abs() <= 1e-4 * c.abs(), "step {}: loss {a} on cuda-emu, {c} on the CPU", step + 1);
    }
    assert_eq!(weights_emu.len(), weights_cpu.len());
    for (name, a) in &weights_emu {
        // A key bias adds q.b to every score of a query's row, which the
        // softmax removes: its gradient is 0 but for rounding, which AdamW
        // scales up to full steps, on any backend. It is noise either way.
        if name.ends_with("self_attn.k_proj.bias") {
            assert!(a.iter().all(|v| v.abs() < 1e-3), "{name} moved more than rounding noise can move it");
            continue;
        }
        let c = &weights_cpu[name];
        let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(c).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale.max(1e-6), "{name}: max difference {diff:e}, largest value {scale:e}");
    }
}

/// Negative control: an embedding id past the table makes the gather
/// kernel trap, as on a GPU; `check()` names the kernel and reports the
/// error as one that loses the device (the worker exits to be replaced).
#[test]
fn a_trapping_kernel_is_named_and_loses_the_device() {
    let be = Cuda::emulated(MathMode::F32).unwrap();
    let table = be.upload(&[1.0; 12]); // 3 rows of 4
    let ids = be.upload_idx(&[0, 7]);
    let mut out = be.alloc(8);
    be.embedding_fwd(&table, &ids, &mut out, 2, 4);
    let e = be.check().unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("gather_rows_f32") && msg.contains("__trap"), "{msg}");
    assert!(tessera_worker::engine::device::device_lost(&e), "{msg}");
    // The emulator itself is still usable (a test device can go on).
    let ids = be.upload_idx(&[2, 0]);
    be.embedding_fwd(&table, &ids, &mut out, 2, 4);
    be.check().unwrap();
}

/// The tracking allocator sees a model workspace change shape without
/// holding the old and the new at once.
#[test]
fn a_new_workspace_shape_does_not_hold_the_old_one() {
    use tessera_worker::model::llama::Llama;
    use tessera_worker::model::ParamStore;
    let be = Cuda::emulated(MathMode::F32).unwrap();
    let cfg = ModelConfig::named_preset("tiny").unwrap();
    let params = ParamStore::init(&be, &cfg, 0);
    let mut llm = Llama::new(&cfg.llm, &params, false);
    let base = be.peak_memory_bytes().unwrap();
    llm.input(&be, 8, 64);
    let big = be.peak_memory_bytes().unwrap() - base;
    llm.input(&be, 6, 48);
    let after = be.peak_memory_bytes().unwrap() - base;
    assert!(big > 0);
    assert_eq!(after, big, "the 6x48 workspace was allocated while the 8x64 one was still held");
}

/// The memory planner against the emulated device's tracking allocator:
/// a training step's measured peak (parameters, optimizer state, every
/// workspace, the ops' scratch) within 10% of the plan, for f32 and bf16
/// storage and with and without recomputation.
#[test]
fn the_memory_plan_matches_the_measured_peak() {
    use tessera_worker::engine::attention_scratch::attention_peak_scratch_bytes;
    use tessera_worker::model::memory::{gib, MemoryJob};
    use tessera_worker::model::{Batch, ParamStore, Recompute, Trainable, Vlm};
    use tessera_worker::train::{train_step, OptimConfig, Optimizer};
    let cfg = ModelConfig::named_preset("tiny").unwrap();
    let mut report = Vec::new();
    for (mode, act_bytes) in [(MathMode::F32, 4), (MathMode::Bf16, 2)] {
        for recompute in [Recompute::None, Recompute::All] {
            for (batch, text) in [(4, 16), (2, 40)] {
                let be = Cuda::emulated(mode).unwrap();
                let mut vlm = Vlm::new(&cfg, ParamStore::init(&be, &cfg, 0), recompute);
                let mut opt =
                    Optimizer::new(&be, OptimConfig { total_steps: 10, ..OptimConfig::default() }, &vlm.params);
                train_step(&be, &mut vlm, &mut opt, &[Batch::synthetic(&cfg, batch, text, 1)]).unwrap();
                let measured = be.peak_memory_bytes().unwrap();
                let plan = MemoryJob {
                    model: cfg.clone(),
                    micro_batch: batch,
                    text_tokens: text,
                    act_bytes,
                    compute_copies: act_bytes == 2,
                    recompute,
                    trainable: Trainable::ALL,
                    world_size: 1,
                    attention_scratch: attention_peak_scratch_bytes,
                    reserve_bytes: 0,
                }
                .plan()
                .peak_bytes();
                let err = (plan as f64 - measured as f64) / measured as f64;
                report.push(format!(
                    "{mode:?} {recompute:?} batch {batch} text {text}: plan {:.4} GiB, measured {:.4} GiB, {:+.1}%",
                    gib(plan),
                    gib(measured),
                    100.0 * err
                ));
                assert!(err.abs() < 0.10, "{}", report.join("\n"));
            }
        }
    }
    println!("{}", report.join("\n"));
}

/// scripts/device-check.sh as a GPU machine runs it, with the emulated
/// device as the GPU (tiny shapes, no PyTorch): every part passes, the
/// step rows carry the tracking allocator's peak memory, and the verdict
/// has one line per part.
#[test]
fn the_device_check_passes_on_the_emulated_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(root().join("scripts/device-check.sh"));
    cmd.current_dir(root()).arg(env!("CARGO_BIN_EXE_worker")).env("OUT", dir.path());
    for (k, v) in [("DEVICE", "cuda-emu"), ("PRESET", "tiny"), ("TORCH", "skip"), ("BATCH", "2"), ("SEQ", "8")] {
        cmd.env(k, v);
    }
    for (k, v) in [("VIT_LAYERS", "2"), ("LLM_LAYERS", "1"), ("WARMUP", "0"), ("STEPS", "1")] {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("run scripts/device-check.sh");
    assert!(o.status.success(), "{}", text(&o));
    let verdict = std::fs::read_to_string(dir.path().join("verdict.txt")).unwrap();
    assert_eq!(verdict.lines().filter(|l| l.contains(" PASS ")).count(), 7, "{verdict}");
    for precision in ["bf16", "tf32"] {
        let row = std::fs::read_to_string(dir.path().join(format!("tessera-{precision}.json"))).unwrap();
        let row: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert_eq!(row["device"], "cuda-emu", "{row}");
        let peak = row["peak_mem_gib"].as_f64().unwrap_or(0.0);
        assert!(peak > 0.0 && peak < 1.0, "{precision}: peak_mem_gib {peak}");
    }
}

/// A job whose plan does not fit the device is refused before it starts,
/// with the numbers: the emulated device given 4 MiB refuses
/// `configs/tiny.toml` (about 6 MiB), and given 64 MiB trains it.
#[test]
fn a_job_too_large_for_the_device_is_refused_with_the_numbers() {
    let run = |gib: &str| {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .current_dir(root())
            .args(["train", "--device", "cuda-emu", "--config", "configs/tiny.toml", "--steps", "1"])
            .env("TESSERA_EMU_MEMORY_GIB", gib)
            .output()
            .expect("run worker train")
    };
    let small = run("0.004");
    assert!(!small.status.success(), "{}", text(&small));
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(
        err.contains("micro-batch of 4 samples")
            && err.contains(" MiB per GPU (parameters ")
            && err.contains("4.1 MiB for buffers"),
        "{err}"
    );
    assert!(err.contains("largest micro-batch that fits is") && !err.contains("panicked"), "{err}");
    let big = run("0.0625");
    assert!(big.status.success(), "{}", text(&big));
}
