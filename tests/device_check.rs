//! scripts/device-check.sh, rehearsed on the CPU: the same script a GPU
//! machine runs (op parity, debug-step against the PyTorch fixtures, the
//! step benchmark and its table), with the CPU as the device and without
//! the PyTorch peer, so that its CPU-side parts are checked on every commit.

mod common;

use std::process::Command;

fn device_check(env: &[(&str, &str)], out: &std::path::Path) -> std::process::Output {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(root.join("scripts/device-check.sh"));
    cmd.arg(common::bin("worker")).env("OUT", out);
    for (k, v) in [("DEVICE", "cpu"), ("PRESET", "tiny"), ("TORCH", "skip"), ("BATCH", "2"), ("SEQ", "8")] {
        cmd.env(k, v);
    }
    for (k, v) in [("VIT_LAYERS", "2"), ("LLM_LAYERS", "1"), ("WARMUP", "0"), ("STEPS", "1")] {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run scripts/device-check.sh")
}

#[test]
fn the_cpu_rehearsal_passes_every_check_and_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let run = device_check(&[], dir.path());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    for check in [
        "ops-f32: exit 0",
        "ops-tf32: exit 0",
        "ops-bf16: exit 0",
        "debug-step: exit 0",
        "debug-step-dynamic: exit 0",
        "step-tessera-bf16: exit 0",
        "step-tessera-tf32: exit 0",
    ] {
        assert!(stdout.contains(check), "no `{check}` in: {stdout}");
    }
    assert!(stdout.contains("| tessera | cpu f32 |"), "{stdout}");
    let table = std::fs::read_to_string(dir.path().join("step_table.md")).unwrap();
    assert!(table.contains("LLM tokens/s") && table.contains("MFU"), "{table}");
    let verdict = std::fs::read_to_string(dir.path().join("verdict.txt")).unwrap();
    assert_eq!(verdict.lines().filter(|l| l.contains(" PASS ")).count(), 7, "{verdict}");
    let done = format!("device-check: all checks passed (logs in {})\n", dir.path().display());
    assert!(stdout.ends_with(&done), "{stdout}");
}

/// Failing checks fail the script, which names them: the worker the test
/// suite builds has no CUDA, so every check on cuda:0 fails (with the
/// reason in its log) and the script still runs them all.
#[test]
fn failing_checks_fail_the_script_and_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = device_check(&[("DEVICE", "cuda:0")], dir.path());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "{stdout}");
    assert!(stdout.contains("built without CUDA support"), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "device-check: FAILED: ops-f32 ops-tf32 ops-bf16 debug-step debug-step-dynamic step-tessera-bf16 \
             step-tessera-tf32"
        ),
        "{last}"
    );
}

/// One failing part costs only its own row: with a precision the worker
/// refuses, that step fails while the other's row still makes the table,
/// and the verdict has one line per part.
#[test]
fn a_failed_part_keeps_the_rows_that_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let run = device_check(&[("PRECISIONS", "bf16 f16")], dir.path());
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "{stdout}");
    let table = std::fs::read_to_string(dir.path().join("step_table.md")).unwrap();
    assert!(table.contains("| tessera | cpu f32 |"), "{table}");
    let verdict = std::fs::read_to_string(dir.path().join("verdict.txt")).unwrap();
    let parts: Vec<&str> = verdict.lines().collect();
    assert_eq!(parts.len(), 7, "{verdict}");
    assert!(parts.iter().any(|l| l.starts_with("step-tessera-bf16") && l.contains("PASS")), "{verdict}");
    assert!(parts.iter().any(|l| l.starts_with("step-tessera-f16") && l.contains("FAIL")), "{verdict}");
    assert_eq!(parts.iter().filter(|l| l.contains("PASS")).count(), 6, "{verdict}");
    assert!(
        stdout.lines().last().unwrap_or_default().starts_with("device-check: FAILED: step-tessera-f16"),
        "{stdout}"
    );
}
