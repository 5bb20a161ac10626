//! The coordinator's command line on bad input. (This file also makes
//! `cargo test --workspace` build the `coordinator` binary the end-to-end
//! tests at the root start.)

use std::process::Command;

fn coordinator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().expect("spawn coordinator")
}

#[test]
fn a_missing_or_malformed_config_is_named() {
    let o = coordinator(&["--config", "/nonexistent/job.toml", "--listen", "127.0.0.1:0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("cannot read job config /nonexistent/job.toml"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("job.toml");
    std::fs::write(&cfg, "[model]\npreset = \"tiny\"\n[train]\nsteps = 1\nbatch_size = 2\n[cluster]\nworld_size = 0\n")
        .unwrap();
    let o = coordinator(&["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("cluster.world_size"), "{e}");

    std::fs::write(&cfg, "[model]\npreset = \"tiny\"\n[train]\nsteps = 1\nbatch_size = 2\n").unwrap();
    let o = coordinator(&["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("[data] is missing"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}
