//! End-to-end tests of watching a job: a real coordinator with a job token
//! and `--metrics-listen`, two real workers, scraped over HTTP and asked
//! with `coordinator status` while they train.

mod common;

use common::cluster::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "operate-token-0123456789abcdef";
// About 20 ms a step here: long enough to scrape and ask twice while it trains.
const STEPS: u64 = 300;

fn coordinator_with_metrics(cfg: &Path, port: u16, metrics_port: u16, out: &Path) -> Child {
    Command::new(common::bin("coordinator"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--out", out.to_str().unwrap(), "--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("TESSERA_JOB_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn worker_with_token(rank: u32, port: u16) -> Child {
    Command::new(common::bin("worker"))
        .args(["--rank", &rank.to_string(), "--coordinator", &format!("http://127.0.0.1:{port}")])
        .args(["--connect-timeout", "30"])
        .env("TESSERA_JOB_TOKEN", TOKEN)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `coordinator status --url ...`, with the job token in the environment or not.
fn status(port: u16, token: Option<&str>) -> Output {
    let mut c = Command::new(common::bin("coordinator"));
    c.args(["status", "--url", &format!("http://127.0.0.1:{port}")]).env_remove("TESSERA_JOB_TOKEN");
    if let Some(t) = token {
        c.env("TESSERA_JOB_TOKEN", t);
    }
    c.output().unwrap()
}

struct HttpReply {
    code: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One HTTP/1.1 GET; None while nothing listens yet.
fn get(port: u16, path: &str, token: Option<&str>) -> Option<HttpReply> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(c, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("the reply is UTF-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let code = status_line[9..12].parse().unwrap();
    let headers = lines
        .map(|l| l.split_once(':').unwrap_or_else(|| panic!("bad header {l:?}")))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect::<BTreeMap<_, _>>();
    if let Some(n) = headers.get("content-length") {
        assert_eq!(n.parse::<usize>().unwrap(), body.len(), "Content-Length");
    }
    Some(HttpReply { code, headers, body: body.to_string() })
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_metric_name(s) && !s.contains(':')
}

/// Fails with `why` unless `ok`.
fn check(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

/// Parses `k="v",...` (the inside of the braces) strictly: escapes \\ \" \n.
fn parse_labels(s: &str, line: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or_else(|| format!("bad labels in {line:?}"))?;
        check(is_label_name(name), || format!("bad label name {name:?} in {line:?}"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err(format!("bad escape in {line:?}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in {line:?}")),
            }
        };
        out.push((name.to_string(), value));
        rest = &after[end + 1..];
        match rest.strip_prefix(',') {
            Some(r) => rest = r,
            None => check(rest.is_empty(), || format!("labels not separated by commas in {line:?}"))?,
        }
    }
    Ok(out)
}

/// A strict reader of the Prometheus text format (0.0.4): every line is a
/// HELP or TYPE comment or a sample of the family TYPEd last; names, labels
/// and values are well formed; a family is TYPEd once; no series repeats.
/// Returns `name{labels}` -> value. (prometheus-parse skips the lines it
/// cannot read, so it would not catch a malformed exposition.)
fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
    check(text.ends_with('\n'), || "the exposition does not end with a newline".into())?;
    let mut samples = BTreeMap::new();
    let mut typed = BTreeSet::new();
    let mut family: Option<(String, String)> = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, what) = (parts.next().unwrap_or_default(), parts.next(), parts.next());
            let name = name.ok_or_else(|| format!("bad comment {line:?}"))?;
            check(is_metric_name(name), || format!("bad name in {line:?}"))?;
            match kind {
                "HELP" => check(what.is_some_and(|h| !h.is_empty()), || format!("empty HELP in {line:?}"))?,
                "TYPE" => {
                    let t = what.unwrap_or_default();
                    let known = ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t);
                    check(known, || format!("unknown type in {line:?}"))?;
                    check(typed.insert(name.to_string()), || format!("{name} TYPEd twice"))?;
                    family = Some((name.to_string(), t.to_string()));
                }
                _ => return Err(format!("unexpected comment {line:?}")),
            }
            continue;
        }
        check(!line.starts_with('#'), || format!("bad comment {line:?}"))?;
        let (series, value) = match line.rfind('}') {
            Some(i) => (&line[..=i], line[i + 1..].strip_prefix(' ').unwrap_or("")),
            None => line.split_once(' ').ok_or_else(|| format!("no value in {line:?}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(&l[..l.len() - 1], line)?),
            None => (series, Vec::new()),
        };
        check(is_metric_name(name), || format!("bad metric name in {line:?}"))?;
        let (fam, kind) = family.as_ref().ok_or_else(|| format!("sample before any TYPE: {line:?}"))?;
        let histogram_part =
            kind == "histogram" && ["_bucket", "_sum", "_count"].iter().any(|p| name == format!("{fam}{p}"));
        check(name == fam || histogram_part, || format!("sample {name} outside its family {fam}"))?;
        let mut fields = value.split(' ');
        let v = match fields.next().unwrap_or_default() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| format!("bad value in {line:?}"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| format!("bad timestamp in {line:?}"))?;
        }
        check(fields.next().is_none(), || format!("trailing fields in {line:?}"))?;
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", l.join(","))
        };
        check(samples.insert(key.clone(), v).is_none(), || format!("{key} twice"))?;
    }
    Ok(samples)
}

/// A scrape with the token that must succeed.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let r = get(port, "/metrics", Some(TOKEN)).expect("the metrics endpoint is up");
    assert_eq!(r.code, 200, "{}", r.body);
    assert!(r.headers["content-type"].starts_with("text/plain; version=0.0.4"), "{:?}", r.headers);
    parse_exposition(&r.body).unwrap_or_else(|e| panic!("{e} in:\n{}", r.body))
}

/// While two workers train 300 steps: /metrics parses as Prometheus text,
/// its step moves between scrapes, per-rank series name both ranks, and a
/// scrape without the token gets 401; `coordinator status` names both
/// ranks and the step (and refuses to answer without the token). After the
/// job, status against the dead port fails with one line.
#[test]
fn a_training_job_can_be_scraped_and_asked_for_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, STEPS, 4, 1, 2, "join_timeout_s = 60", "")).unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let coord = coordinator_with_metrics(&cfg, port, metrics_port, &tmp.path().join("out"));
    let workers: Vec<Child> = (0..2).map(|r| worker_with_token(r, port)).collect();

    // The first scrape once a step is done, then one after the next.
    let start = Instant::now();
    let first = loop {
        assert!(start.elapsed() < Duration::from_secs(180), "no step within 180 s");
        if let Some(r) = get(metrics_port, "/metrics", Some(TOKEN)) {
            assert_eq!(r.code, 200, "{}", r.body);
            let s = parse_exposition(&r.body).unwrap_or_else(|e| panic!("{e} in:\n{}", r.body));
            if s["tessera_step"] >= 1.0 {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let step1 = first["tessera_step"];
    assert!(step1 < STEPS as f64, "the job is still training at the first scrape (step {step1})");
    assert_eq!(first["tessera_total_steps"], STEPS as f64);
    assert_eq!((first["tessera_world_size"], first["tessera_workers_joined"]), (2.0, 2.0));
    assert_eq!((first["tessera_generation"], first["tessera_restarts"]), (1.0, 0.0));
    assert!(first["tessera_loss"] > 0.0 && first["tessera_tokens_per_second"] > 0.0, "{first:?}");
    for rank in ["0", "1"] {
        for m in ["tessera_rank_step_seconds", "tessera_rank_compute_seconds"] {
            let v = first[&format!("{m}{{rank=\"{rank}\"}}")];
            assert!(v > 0.0, "{m} of rank {rank}: {v}");
        }
        assert!(first.contains_key(&format!("tessera_rank_straggler{{rank=\"{rank}\"}}")), "{first:?}");
    }
    for m in ["tessera_plan_imbalance", "tessera_compute_imbalance", "tessera_bad_samples_total", "tessera_stragglers"]
    {
        assert!(first.contains_key(m), "{m} missing: {first:?}");
    }

    let r = get(metrics_port, "/metrics", None).unwrap();
    assert_eq!(r.code, 401, "a scrape without the token: {}", r.body);
    assert_eq!(get(metrics_port, "/metrics", Some("operate-token-0123456789abcdeX")).unwrap().code, 401);
    assert_eq!(get(metrics_port, "/", Some(TOKEN)).unwrap().code, 404);

    let out = status(port, Some(TOKEN));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
    println!("coordinator status:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "a header and one line per rank: {text}");
    assert!(lines[0].starts_with("generation 1, running (training); step "), "{text}");
    assert!(lines[0].contains(&format!("/{STEPS} (")) && lines[0].contains("tokens/s"), "{text}");
    for (rank, line) in lines[1..].iter().enumerate() {
        assert!(line.starts_with(&format!("  rank {rank}   training ")), "{text}");
        assert!(line.contains(" cpu, last heartbeat ") && line.ends_with(" s ago"), "{text}");
    }
    let refused = status(port, None);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("refused") && err.lines().count() == 1, "{err}");

    let second = loop {
        let s = scrape(metrics_port);
        if s["tessera_step"] > step1 {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "the step gauge stayed at {step1}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(second["tessera_step"] <= STEPS as f64);

    for (r, w) in workers.into_iter().enumerate() {
        let o = wait(w, Duration::from_secs(240), "worker");
        assert!(o.status.success(), "worker {r} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = wait(coord, Duration::from_secs(60), "coordinator");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "coordinator failed: {log}");
    assert!(!log.contains(TOKEN), "the coordinator's log shows the token");

    let dead = status(port, Some(TOKEN));
    let err = String::from_utf8_lossy(&dead.stderr);
    assert!(!dead.status.success(), "status against a dead coordinator succeeded");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!("coordinator status: cannot reach the coordinator at http://127.0.0.1:{port}")),
        "{err}"
    );
}

/// The strict reader refuses what a lenient one would skip.
#[test]
fn the_exposition_reader_is_strict() {
    let good = "# HELP a_b Help.\n# TYPE a_b gauge\na_b{rank=\"0\",x=\"q\\\"\"} 1.5\na_b 2\n";
    assert_eq!(parse_exposition(good).unwrap().len(), 2);
    for bad in [
        "a_b 1\n",                              // no TYPE
        "# TYPE a_b gauge\na_b one\n",          // bad value
        "# TYPE a_b gauge\na_b{rank=0} 1\n",    // unquoted label
        "# TYPE a_b gauge\nc_d 1\n",            // outside its family
        "# TYPE a_b gauge\na_b 1\na_b 2\n",     // repeated series
        "# TYPE a_b gauge\n# TYPE a_b gauge\n", // TYPEd twice
        "# TYPE a_b gauge\na_b 1",              // no final newline
        "# TYPE a_b gauge\n9ab 1\n",            // bad name
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted {bad:?}");
    }
}
