//! `worker debug-step` against the PyTorch + transformers reference
//! (fixtures written by tools/make_fixtures.py), and its bad-input errors.

mod common;

use common::{assert_clean_error, copy_dir, fixtures, worker};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;
use tessera_worker::debug_step::compare;

/// Runs `worker debug-step` on `batch` and checks the loss (1e-5 relative)
/// and every gradient (1e-4 relative norm error) against `expected`;
/// returns how many gradients were compared.
fn matches_reference(batch: &str, expected: &str) -> usize {
    let tiny = fixtures().join("tiny");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grads.safetensors");
    let run = debug_step(&tiny.join("model"), &tiny.join(batch), &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let c = compare(&out, &tiny.join(expected)).unwrap();
    assert!(c.loss_error < 1e-5, "loss error {:e}", c.loss_error);
    for (name, e) in &c.grads {
        assert!(*e < 1e-4, "{name}: relative norm error {e:.2e}");
    }
    assert!(c.nonzero_where_zero.is_empty(), "expected zero gradients: {:?}", c.nonzero_where_zero);
    assert!(c.passes(1e-5, 1e-4));
    c.grads.len()
}

/// `--expect` prints the comparison and fails on a mismatch: against the
/// dynamic-S2 reference, the static batch's gradients are wrong.
#[test]
fn expect_flag_reports_and_refuses_a_mismatch() {
    let tiny = fixtures().join("tiny");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grads.safetensors");
    let run = |expected: &str| {
        let reference = tiny.join(expected);
        let expect = ["--expect", reference.to_str().unwrap()];
        debug_step_with(&tiny.join("model"), &tiny.join("batch.safetensors"), &out, &expect)
    };
    let good = run("expected_grads.safetensors");
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success() && stdout.contains("60 gradients, worst"), "{stdout}");
    let bad = run("expected_grads_dynamic.safetensors");
    assert!(!bad.status.success());
    assert_clean_error(&bad, "does not match");
}

#[test]
fn debug_step_matches_pytorch_reference() {
    // 80 tensors less 18 unused (layer 2, post_layernorm) and 2 k_proj biases.
    assert_eq!(matches_reference("batch.safetensors", "expected_grads.safetensors"), 60, "gradients compared");
}

/// Dynamic S2 (tiles + `tile_grids`, grids 2 x 3 and 4 x 1) against NVILA's
/// `merge_features_for_dynamic_s2` in PyTorch.
#[test]
fn debug_step_dynamic_s2_matches_pytorch_reference() {
    assert_eq!(
        matches_reference("batch_dynamic.safetensors", "expected_grads_dynamic.safetensors"),
        60,
        "gradients compared"
    );
}

fn debug_step(model: &Path, batch: &Path, out: &Path) -> std::process::Output {
    debug_step_with(model, batch, out, &[])
}

fn debug_step_with(model: &Path, batch: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let args = [
        "debug-step",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        batch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    worker(&[&args[..], extra].concat())
}

/// Rewrites the fixture batch with `edit` applied to (name -> (dtype, shape, bytes)).
fn edited_batch(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) -> std::path::PathBuf {
    let bytes = std::fs::read(fixtures().join("tiny/batch.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect();
    edit(&mut m);
    let views: Vec<(String, TensorView)> =
        m.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let path = dir.join("batch.safetensors");
    std::fs::write(&path, safetensors::serialize(views, &None).unwrap()).unwrap();
    path
}

fn map_i64(m: &mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, name: &str, f: impl Fn(i64) -> i64) {
    let e = m.get_mut(name).unwrap();
    e.2 = e.2.chunks_exact(8).flat_map(|c| f(i64::from_le_bytes(c.try_into().unwrap())).to_le_bytes()).collect();
}

#[test]
fn bad_inputs_give_one_clear_line_and_no_panic() {
    let tiny = fixtures().join("tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grads.safetensors");
    let batch = tiny.join("batch.safetensors");
    let model = tiny.join("model");

    // a missing file
    assert_clean_error(&debug_step(&model, &tmp.path().join("nope.safetensors"), &out), "nope.safetensors");

    // a truncated safetensors file in the model
    let m = tmp.path().join("truncated");
    copy_dir(&model, &m);
    let f = m.join("mm_projector/model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::write(&f, &std::fs::read(&f).unwrap()[..(len / 2) as usize]).unwrap();
    assert_clean_error(&debug_step(&m, &batch, &out), "truncated or corrupt");

    // a wrong dtype: input_ids as f32
    let b = edited_batch(tmp.path(), |m| {
        let e = m.get_mut("input_ids").unwrap();
        e.0 = Dtype::F32;
        e.2 =
            e.2.chunks_exact(8)
                .flat_map(|c| (i64::from_le_bytes(c.try_into().unwrap()) as f32).to_le_bytes())
                .collect();
    });
    assert_clean_error(&debug_step(&model, &b, &out), "input_ids has dtype F32");

    // a head count that does not divide the hidden size
    let m = tmp.path().join("heads");
    copy_dir(&model, &m);
    let cfg_path = m.join("llm/config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["num_attention_heads"] = 5.into();
    cfg["num_key_value_heads"] = 5.into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    assert_clean_error(&debug_step(&m, &batch, &out), "num_attention_heads");

    // a batch without a -200 token
    let b = edited_batch(tmp.path(), |m| map_i64(m, "input_ids", |x| if x == -200 { 7 } else { x }));
    assert_clean_error(&debug_step(&model, &b, &out), "no image token");

    // labels all -100
    let b = edited_batch(tmp.path(), |m| map_i64(m, "labels", |_| -100));
    assert_clean_error(&debug_step(&model, &b, &out), "every label is -100");

    assert!(!out.exists(), "a failed run must not leave a gradient file");
}
