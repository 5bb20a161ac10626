//! End-to-end tests of who may talk to a coordinator: a real coordinator
//! process with a job token, called over gRPC by a hand-made client (to send
//! what a worker never would) and by real workers.

mod common;

use common::cluster::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tessera_proto::v1::*;
use tessera_proto::CoordinatorClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "job-token-0123456789abcdef";

fn coordinator_with_token(cfg: &std::path::Path, port: u16, out: &std::path::Path) -> Child {
    Command::new(common::bin("coordinator"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--out", out.to_str().unwrap()])
        .env("TESSERA_JOB_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn connect(port: u16) -> CoordinatorClient<Channel> {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if let Ok(c) = CoordinatorClient::connect(url.clone()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the coordinator did not come up");
}

/// A request with this token (if any) and session (if any).
fn req<T>(msg: T, token: Option<&str>, session: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(s) = session {
        r.metadata_mut().insert("x-tessera-session", s.parse().unwrap());
    }
    r
}

/// Sends `msgs` on one heartbeat stream and returns the answers.
async fn beats(
    client: &mut CoordinatorClient<Channel>,
    msgs: Vec<HeartbeatRequest>,
    token: Option<&str>,
    session: Option<&str>,
) -> Result<Vec<HeartbeatReply>, tonic::Status> {
    let mut replies = client.heartbeats(req(tokio_stream::iter(msgs), token, session)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(r) = replies.message().await? {
        out.push(r);
    }
    Ok(out)
}

fn join_request(rank: u32, pid: u32) -> JoinRequest {
    JoinRequest {
        protocol_version: tessera_proto::PROTOCOL_VERSION,
        rank: Some(rank),
        host: "test-host".into(),
        device: "cpu".into(),
        collective_addr: format!("127.0.0.1:{}", 40000 + pid),
        pid,
    }
}

/// Every RPC without the job token, or with another one, is refused with
/// UNAUTHENTICATED before it does anything; with it, a worker may speak
/// only for the rank it joined as (PERMISSION_DENIED otherwise), also to
/// another rank's session.
#[test]
fn calls_without_the_token_or_for_another_rank_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, 2, 4, 1, 2, "join_timeout_s = 60", "")).unwrap();
    let port = free_port();
    let mut c = coordinator_with_token(&cfg, port, &tmp.path().join("out"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut client = connect(port).await;
        for token in [None, Some("job-token-0123456789abcdeX"), Some("short")] {
            let codes = vec![
                client.join(req(join_request(0, 1), token, None)).await.unwrap_err().code(),
                client.rendezvous(req(RendezvousRequest::default(), token, None)).await.unwrap_err().code(),
                client.get_assignment(req(AssignmentRequest::default(), token, None)).await.unwrap_err().code(),
                client.report_step(req(StepReport::default(), token, None)).await.unwrap_err().code(),
                beats(&mut client, vec![HeartbeatRequest::default()], token, None).await.unwrap_err().code(),
                client.leave(req(LeaveRequest::default(), token, None)).await.unwrap_err().code(),
                client.commit_checkpoint(req(CheckpointPart::default(), token, None)).await.unwrap_err().code(),
            ];
            assert!(codes.iter().all(|&c| c == Code::Unauthenticated), "token {token:?}: {codes:?}");
        }
        let status = client.join(req(join_request(0, 1), None, None)).await.unwrap_err();
        assert!(status.message().contains("job token") && !status.message().contains(TOKEN), "{status:?}");

        let t = Some(TOKEN);
        let a = client.join(req(join_request(0, 1), t, None)).await.unwrap().into_inner();
        let b = client.join(req(join_request(1, 2), t, None)).await.unwrap().into_inner();
        assert_ne!(a.session_secret, b.session_secret);
        let beat = |rank| HeartbeatRequest { rank, generation: a.generation, step: 0 };
        let ok = beats(&mut client, vec![beat(1)], t, Some(&b.session_secret)).await.unwrap();
        assert_eq!(ok[0].action, Action::Continue as i32);
        // Beats for rank 1 without its session are answered "join again"
        // and do not keep rank 1 alive.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for session in [Some(a.session_secret.as_str()), None, Some("00000000000000000000000000000000")] {
            let answers = beats(&mut client, vec![beat(1), beat(1)], t, session).await.unwrap();
            assert_eq!(answers.len(), 2, "{session:?}: every beat is answered");
            for r in answers {
                assert_eq!(r.action, Action::Abort as i32, "{session:?}: {r:?}");
                assert!(r.reason.contains("rank 1") && r.reason.contains("join again"), "{r:?}");
            }
        }
        let last_seen = |s: &JobStatus| s.ranks.iter().find(|r| r.rank == 1).and_then(|r| r.last_seen_s_ago);
        let status = client.get_status(req(StatusRequest::default(), t, None)).await.unwrap().into_inner();
        assert!(last_seen(&status).unwrap() >= 1.4, "forged beats touched rank 1: {status:?}");
        beats(&mut client, vec![beat(1)], t, Some(&b.session_secret)).await.unwrap();
        let status = client.get_status(req(StatusRequest::default(), t, None)).await.unwrap().into_inner();
        assert!(last_seen(&status).unwrap() < 1.0, "rank 1's own beat counts: {status:?}");
        let leave = LeaveRequest {
            rank: 1,
            generation: a.generation,
            finished: false,
            error: "x".into(),
            ..Default::default()
        };
        let e = client.leave(req(leave, t, Some(&a.session_secret))).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "rank 0 cannot make rank 1 leave: {e:?}");
    });
    let _ = c.kill();
    let _ = c.wait();
}

/// Real workers with the token train a job whose coordinator demands it;
/// a worker without it is refused with a message that says so.
#[test]
fn workers_with_the_token_train_and_one_without_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, 3, 4, 1, 2, "", "")).unwrap();
    let token_file = tmp.path().join("job.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let port = free_port();
    let c = coordinator_with_token(&cfg, port, &tmp.path().join("out"));
    let stranger = wait(worker(&["--rank", "0"], port), Duration::from_secs(60), "worker");
    let e = String::from_utf8_lossy(&stranger.stderr);
    assert!(!stranger.status.success() && e.contains("job token") && !e.contains("panicked"), "{e}");
    let workers: Vec<Child> = (0..2)
        .map(|r| {
            Command::new(common::bin("worker"))
                .args(["--rank", &r.to_string(), "--coordinator", &format!("http://127.0.0.1:{port}")])
                .args(["--token-file", token_file.to_str().unwrap()])
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, w) in workers.into_iter().enumerate() {
        let o = wait(w, Duration::from_secs(120), "worker");
        let log = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "worker {r}: {log}");
        assert!(!log.contains(TOKEN), "the token is never logged: {log}");
    }
    let o = wait(c, Duration::from_secs(60), "coordinator");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(!log.contains(TOKEN), "the token is never logged: {log}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("trained 3 steps"), "{stdout}");
}

/// A test CA and what it signs, written as PEM files under `dir`.
struct Pki {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn make_pki(dir: &std::path::Path, name: &str, sans: &[&str], purpose: rcgen::ExtendedKeyUsagePurpose) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut leaf = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    leaf.extended_key_usages = vec![purpose];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert, leaf_cert.pem()).unwrap();
    std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
    pki
}

/// A one-worker job over TLS: the worker trusting the coordinator's CA
/// trains; one trusting another CA cannot connect. With a client CA on the
/// coordinator (mutual TLS), a worker needs a certificate signed by it.
#[test]
fn tls_join_works_with_the_right_ca_and_fails_with_another() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let server = make_pki(tmp.path(), "server", &["localhost", "127.0.0.1"], ServerAuth);
    let stranger = make_pki(tmp.path(), "stranger", &["localhost"], ServerAuth);
    let client = make_pki(tmp.path(), "client", &["worker-0"], ClientAuth);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, 2, 4, 1, 1, "join_timeout_s = 60", "")).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();

    for mutual in [false, true] {
        let port = free_port();
        let out = tmp.path().join(format!("out-{mutual}"));
        let mut args = vec![
            "--config".to_string(),
            path(&cfg),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--out".into(),
            path(&out),
            "--tls-cert".into(),
            path(&server.cert),
            "--tls-key".into(),
            path(&server.key),
        ];
        if mutual {
            args.extend(["--tls-client-ca".into(), path(&client.ca)]);
        }
        let c = Command::new(common::bin("coordinator"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let run_worker = |ca: &Pki, identity: Option<&Pki>| {
            let mut cmd = Command::new(common::bin("worker"));
            cmd.args(["--rank", "0", "--coordinator", &format!("https://localhost:{port}"), "--connect-timeout", "3"])
                .args(["--tls-ca", &path(&ca.ca)]);
            if let Some(id) = identity {
                cmd.args(["--tls-cert", &path(&id.cert), "--tls-key", &path(&id.key)]);
            }
            let child =
                cmd.env("RAYON_NUM_THREADS", "1").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            wait(child, Duration::from_secs(120), "worker")
        };
        let refused = run_worker(&stranger, mutual.then_some(&client));
        let e = String::from_utf8_lossy(&refused.stderr);
        println!("mutual={mutual}, another CA: {}", e.lines().last().unwrap_or(""));
        assert!(!refused.status.success() && !e.contains("panicked"), "{e}");
        assert!(e.contains("cannot reach the coordinator") || e.contains("certificate"), "another CA: {e}");
        if mutual {
            let anonymous = run_worker(&server, None);
            let e = String::from_utf8_lossy(&anonymous.stderr);
            println!("no client certificate: {}", e.lines().last().unwrap_or(""));
            assert!(!anonymous.status.success() && !e.contains("panicked"), "no client certificate: {e}");
        }
        let ok = run_worker(&server, mutual.then_some(&client));
        assert!(ok.status.success(), "mutual={mutual}: {}", String::from_utf8_lossy(&ok.stderr));
        let o = wait(c, Duration::from_secs(60), "coordinator");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("trained 2 steps"));
    }
}
