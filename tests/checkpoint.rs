//! Checkpoints and resume of `worker train`, with real processes
//! and files: a run killed with SIGKILL after a checkpoint commits, and
//! restarted, ends with the same bits as a run that was never interrupted,
//! also when its newest checkpoint was damaged in between.

mod common;

use common::{bin, committed_checkpoints};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 40;

fn make_data(dir: &Path) {
    let out = Command::new(bin("worker"))
        .args(["make-demo-data", "--out", dir.to_str().unwrap(), "--train", "64", "--eval", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A job on the demo data that checkpoints every 2 steps, keeping 2.
fn write_config(dir: &Path, data: &Path, checkpoints: &Path) -> PathBuf {
    let (d, c) = (data.display(), checkpoints.display());
    let toml = format!(
        r#"
[model]
preset = "tiny"
[train]
steps = {STEPS}
batch_size = 4
grad_accum = 2
seed = 5
warmup_ratio = 0.1
[data]
tokenizer = "{d}/tokenizer.json"
prefetch = 2
[[data.datasets]]
path = "{d}/train.jsonl"
image_folder = "{d}/images"
[checkpoint]
dir = "{c}"
every = 2
keep = 2
"#
    );
    let path = dir.join(format!("job-{}.toml", checkpoints.file_name().unwrap().to_string_lossy()));
    std::fs::write(&path, toml).unwrap();
    path
}

fn train(config: &Path, out: &Path) -> std::process::Output {
    train_command(config, out).output().unwrap()
}

/// `worker train` on the CPU with `config`, saving the model to `out`.
fn train_command(config: &Path, out: &Path) -> Command {
    let mut c = Command::new(bin("worker"));
    c.args(["train", "--device", "cpu", "--config", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    c
}

fn model_bytes(dir: &Path) -> Vec<Vec<u8>> {
    ["vision_tower", "mm_projector", "llm"]
        .iter()
        .map(|m| std::fs::read(dir.join(m).join("model.safetensors")).unwrap())
        .collect()
}

#[test]
fn a_killed_run_resumes_to_the_same_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);

    // The reference: never interrupted.
    let reference = write_config(tmp.path(), &data, &tmp.path().join("ck-reference"));
    let run = train(&reference, &tmp.path().join("model-reference"));
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(committed_checkpoints(&tmp.path().join("ck-reference")), ["step-00000038", "step-00000040"], "keep = 2");

    // Killed with SIGKILL once its first checkpoint has committed.
    let ck = tmp.path().join("ck-killed");
    let config = write_config(tmp.path(), &data, &ck);
    let out = tmp.path().join("model-killed");
    let mut child = train_command(&config, &out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while committed_checkpoints(&ck).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let left = committed_checkpoints(&ck);
    assert!(!out.exists() && !left.is_empty(), "the run ended before the kill: {left:?}");

    // Damage the newest checkpoint: the restart must notice and use the one before,
    // when there is one.
    let newest = ck.join(left.last().unwrap());
    let opt = newest.join("optimizer-00000-of-00001.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&opt, bytes).unwrap();

    let resumed = train(&config, &out);
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success(), "{stdout}{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(stdout.contains("skipping damaged checkpoint") && stdout.contains("checksum mismatch"), "{stdout}");
    if left.len() > 1 {
        let at = stdout.lines().find(|l| l.starts_with("resumed from")).unwrap_or_else(|| panic!("{stdout}"));
        assert!(at.contains(&left[left.len() - 2]), "{at} (committed: {left:?})");
    } else {
        assert!(!stdout.contains("resumed from"), "only a damaged checkpoint: start over; {stdout}");
    }
    assert!(
        model_bytes(&out) == model_bytes(&tmp.path().join("model-reference")),
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

/// SIGKILL while a checkpoint is being written (its temporary directory
/// exists): the previous checkpoint is intact and is the one resumed from,
/// and the run still ends with the bits of an uninterrupted one.
#[test]
fn a_kill_during_a_checkpoint_write_resumes_from_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let reference = write_config(tmp.path(), &data, &tmp.path().join("ck-reference"));
    assert!(train(&reference, &tmp.path().join("model-reference")).status.success());

    // The kill must land between the temporary directory's creation and its
    // rename; a few tries make that near certain.
    for attempt in 0..20 {
        let ck = tmp.path().join(format!("ck-{attempt}"));
        let config = write_config(tmp.path(), &data, &ck);
        let out = tmp.path().join(format!("model-{attempt}"));
        let mut child = train_command(&config, &out).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // The second checkpoint's write, so that an older one exists.
        let writing = ck.join(".step-00000004.g0.staging");
        let start = Instant::now();
        while !writing.exists() && start.elapsed() < Duration::from_secs(60) {
            std::thread::yield_now();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if !writing.exists() || committed_checkpoints(&ck) != ["step-00000002"] {
            continue; // the write finished before the kill: try again
        }
        println!("the kill landed in the checkpoint write on attempt {}", attempt + 1);
        let resumed = train(&config, &out);
        let stdout = String::from_utf8_lossy(&resumed.stdout);
        assert!(resumed.status.success(), "{stdout}{}", String::from_utf8_lossy(&resumed.stderr));
        assert!(stdout.contains("step-00000002 (step 2 of"), "resumed from the previous checkpoint: {stdout}");
        assert!(!writing.exists(), "the unfinished write was replaced");
        assert!(model_bytes(&out) == model_bytes(&tmp.path().join("model-reference")));
        return;
    }
    panic!("20 kills all missed the checkpoint write");
}

/// SIGTERM (a scheduler's preemption) stops the run after the step in
/// progress with a checkpoint of that step, off the `every` schedule, and a
/// clear message; the same command then finishes the run with the bits of
/// an uninterrupted one.
#[test]
fn sigterm_stops_with_a_checkpoint_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let reference = write_config(tmp.path(), &data, &tmp.path().join("ck-reference"));
    assert!(train(&reference, &tmp.path().join("model-reference")).status.success());

    let ck = tmp.path().join("ck-term");
    let config = write_config(tmp.path(), &data, &ck);
    // Checkpoints only at the end, so the one the signal makes is the only one.
    let text = std::fs::read_to_string(&config).unwrap().replace("every = 2", "every = 1000");
    std::fs::write(&config, text).unwrap();
    let out = tmp.path().join("model-term");
    let mut child = train_command(&config, &out).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The step lines arrive as they are printed (Rust's stdout is line-buffered).
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let second = format!("step     2/{STEPS}");
    assert!(lines.any(|l| l.unwrap().starts_with(&second)), "training did not start");
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    lines.for_each(drop);
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success() && stderr.contains("stopped by a signal after step"), "{stderr}");
    let left = committed_checkpoints(&ck);
    assert_eq!(left.len(), 1, "{left:?}");
    let step: u64 = left[0].trim_start_matches("step-").parse().unwrap();
    assert!((2..STEPS).contains(&step), "{left:?}");
    assert!(stderr.contains(&format!("after step {step} of {STEPS}")), "{stderr}");
    assert!(!out.exists());

    let resumed = train(&config, &out);
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    assert!(resumed.status.success() && stdout.contains(&format!("(step {step} of {STEPS})")), "{stdout}");
    assert!(model_bytes(&out) == model_bytes(&tmp.path().join("model-reference")));
}

/// Without `[checkpoint]` nothing is written; a run that finished resumes
/// at its end and trains no further step.
#[test]
fn a_finished_run_restarts_at_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let ck = tmp.path().join("ck");
    let config = write_config(tmp.path(), &data, &ck);
    let first = train(&config, &tmp.path().join("a"));
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let again = train(&config, &tmp.path().join("b"));
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && stdout.contains(&format!("(step {STEPS} of {STEPS})")), "{stdout}");
    assert!(!stdout.contains("loss "), "no step should run again: {stdout}");
    assert!(model_bytes(&tmp.path().join("a")) == model_bytes(&tmp.path().join("b")));
}
