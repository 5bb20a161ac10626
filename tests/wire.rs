//! The coordinator against hostile input on the wire: arbitrary bytes in
//! every RPC (a fuzz harness kept here, deterministic, longer with
//! WIRE_FUZZ_CASES=N), an oversized message, and a client over its rate.
//! Each is refused with a status while the coordinator goes on serving.

mod common;

use bytes::{Buf, BufMut};
use common::cluster::*;
use prost::Message;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tessera_proto::v1::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "wire-token-0123456789abcdef";

/// Sends and receives message bodies as raw bytes, so the test can put on
/// the wire what no generated client would.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let out = src.chunk().to_vec();
        src.advance(out.len());
        Ok(Some(out))
    }
}

const METHODS: [&str; 7] =
    ["Join", "Rendezvous", "GetAssignment", "ReportStep", "Heartbeats", "Leave", "CommitCheckpoint"];

async fn call(channel: &Channel, method: &str, body: Vec<u8>, session: Option<&str>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| Status::unavailable(format!("transport: {e}")))?;
    let mut req = Request::new(body);
    req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    if let Some(s) = session {
        req.metadata_mut().insert("x-tessera-session", s.parse().unwrap());
    }
    let path = PathAndQuery::try_from(format!("/tessera.v1.Coordinator/{method}")).unwrap();
    grpc.unary(req, path, Raw).await.map(|r| r.into_inner())
}

/// A coordinator with the job token, for a 2-rank job with `cluster`
/// settings added.
fn start(cluster: &str, extra_flags: &[&str]) -> (tempfile::TempDir, Child, u16) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_data(&data);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(&cfg, config(&data, 2, 4, 1, 2, cluster, "")).unwrap();
    let port = free_port();
    let c = Command::new(common::bin("coordinator"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--out", tmp.path().join("out").to_str().unwrap()])
        .args(extra_flags)
        .env("TESSERA_JOB_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (tmp, c, port)
}

async fn channel(port: u16) -> Channel {
    for _ in 0..200 {
        if let Ok(c) = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the coordinator did not come up");
}

/// xorshift64*: the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A legitimate message of each method, for mutation.
fn valid(method: &str, generation: u64) -> Vec<u8> {
    match method {
        "Join" => JoinRequest {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank: Some(1),
            host: "h".into(),
            device: "cpu".into(),
            collective_addr: "127.0.0.1:1".into(),
            pid: 7,
        }
        .encode_to_vec(),
        "Rendezvous" => RendezvousRequest { rank: 0, generation, member_id: 1, ..Default::default() }.encode_to_vec(),
        "GetAssignment" => AssignmentRequest { rank: 0, generation, step: 1 }.encode_to_vec(),
        "ReportStep" => {
            StepReport { rank: 0, generation, step: 0, loss_sum: 1.0, ..Default::default() }.encode_to_vec()
        }
        "Heartbeats" => HeartbeatRequest { rank: 0, generation, step: 0 }.encode_to_vec(),
        "Leave" => LeaveRequest { rank: 0, generation, will_rejoin: true, ..Default::default() }.encode_to_vec(),
        _ => CheckpointPart {
            rank: 0,
            generation,
            step: 2,
            files: vec![CheckpointFile { path: "../../etc/passwd".into(), bytes: 1, sha256: "00".into() }],
        }
        .encode_to_vec(),
    }
}

/// Arbitrary and mutated bodies for every RPC, sent by a client holding a
/// real rank's session (so the handlers behind the checks run too): each
/// gets an answer, never a dropped connection, and the coordinator keeps
/// serving the real rank's heartbeats throughout.
#[test]
fn arbitrary_bytes_in_every_rpc_get_an_answer_and_the_coordinator_goes_on() {
    let cases: usize = std::env::var("WIRE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let (_tmp, mut c, port) = start("join_timeout_s = 600", &["--rate-limit", "1000000"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let counts = rt.block_on(async {
        let ch = channel(port).await;
        let join = JoinRequest {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank: Some(0),
            host: "fuzzer".into(),
            device: "cpu".into(),
            collective_addr: "127.0.0.1:2".into(),
            pid: 1,
        };
        let reply = JoinReply::decode(&call(&ch, "Join", join.encode_to_vec(), None).await.unwrap()[..]).unwrap();
        let session = reply.session_secret.clone();
        let beat = HeartbeatRequest { rank: 0, generation: reply.generation, step: 0 }.encode_to_vec();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for i in 0..cases {
            let method = METHODS[rng.below(METHODS.len())];
            let body = if rng.below(2) == 0 {
                (0..rng.below(200)).map(|_| rng.next() as u8).collect()
            } else {
                let mut b = valid(method, reply.generation);
                for _ in 0..1 + rng.below(4) {
                    if !b.is_empty() {
                        let at = rng.below(b.len());
                        b[at] = rng.next() as u8;
                    }
                }
                b
            };
            // Never a real Leave of the fuzzer's own rank with its session,
            // which would end its membership (a legitimate act, not a bug).
            let s = (method != "Leave").then_some(session.as_str());
            match call(&ch, method, body, s).await {
                Ok(_) => *counts.entry("ok".into()).or_default() += 1,
                Err(st) => {
                    assert!(!st.message().starts_with("transport"), "case {i} ({method}): {st:?}");
                    *counts.entry(format!("{:?}", st.code())).or_default() += 1;
                }
            }
            if i % 100 == 0 {
                let answer = call(&ch, "Heartbeats", beat.clone(), Some(&session)).await;
                let reply = HeartbeatReply::decode(&answer.expect("the coordinator stopped serving")[..]).unwrap();
                assert_eq!(reply.action, Action::Continue as i32, "case {i}: the fuzzer's rank was lost: {reply:?}");
            }
        }
        counts
    });
    println!("{cases} cases: {counts:?}");
    assert!(c.try_wait().unwrap().is_none(), "the coordinator exited");
    assert!(counts.len() > 2, "the cases reach several outcomes: {counts:?}");
    let _ = c.kill();
    let _ = c.wait();
}

/// A request over --max-message-bytes is refused with OUT_OF_RANGE before
/// it is decoded, and the coordinator serves the same client and others
/// right after; a client over --rate-limit gets RESOURCE_EXHAUSTED while
/// another connection is still served.
#[test]
fn an_oversized_message_and_a_flood_are_refused_while_others_are_served() {
    let (_tmp, mut c, port) = start("join_timeout_s = 600", &["--max-message-bytes", "4096", "--rate-limit", "20"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (a, b) = (channel(port).await, channel(port).await);
        let join = |host: String, rank: u32| JoinRequest {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank: Some(rank),
            host,
            device: "cpu".into(),
            collective_addr: "127.0.0.1:3".into(),
            pid: rank + 10,
        };
        let big = join("x".repeat(100_000), 0).encode_to_vec();
        let e = call(&a, "Join", big, None).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
        assert!(
            call(&a, "Join", join("a".into(), 0).encode_to_vec(), None).await.is_ok(),
            "the same client, right after"
        );
        assert!(call(&b, "Join", join("b".into(), 1).encode_to_vec(), None).await.is_ok(), "another client");

        let beat = HeartbeatRequest::default().encode_to_vec();
        let mut limited = 0;
        for _ in 0..100 {
            if let Err(e) = call(&a, "Heartbeats", beat.clone(), None).await {
                if e.code() == Code::ResourceExhausted {
                    assert!(e.message().contains("rate limit"), "{e:?}");
                    limited += 1;
                }
            }
        }
        assert!(limited > 50, "100 calls at once against 20/s (bursts of 40): {limited} refused");
        let answer = HeartbeatReply::decode(&call(&b, "Heartbeats", beat, None).await.unwrap()[..]).unwrap();
        assert_eq!(answer.action, Action::Abort as i32, "the other client is still served (and checked): {answer:?}");
        assert!(answer.reason.contains("without that rank's session"), "{answer:?}");

        // A flood of beats on one open stream is refused too: each beat
        // counts against the peer's rate, not only the stream's opening.
        let mut client = tessera_proto::CoordinatorClient::new(channel(port).await);
        let mut flood = Request::new(tokio_stream::iter(vec![HeartbeatRequest::default(); 100]));
        flood.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        let mut replies = client.heartbeats(flood).await.unwrap().into_inner();
        let mut answered = 0;
        let e = loop {
            match replies.message().await {
                Ok(Some(_)) => answered += 1,
                Ok(None) => panic!("100 beats at once against 20/s were all answered"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("rate limit"), "{e:?}");
        assert!(answered < 40, "no more than the burst of 40, less the stream's opening: {answered}");
    });
    assert!(c.try_wait().unwrap().is_none(), "the coordinator exited");
    let _ = c.kill();
    let _ = c.wait();
}

/// A client that keeps a heartbeat stream open, and silent, does not keep
/// the coordinator from exiting when the job ends: a connection still open
/// after the stop's grace is closed. (An idle connection held the stop the
/// same way, by hand; this covers the same path.)
#[test]
fn an_open_heartbeat_stream_does_not_hold_the_coordinator_at_exit() {
    // Nobody joins: the job fails after join_timeout_s.
    let (_tmp, c, port) = start("join_timeout_s = 1", &[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (beats, rx) = tokio::sync::mpsc::channel::<HeartbeatRequest>(1);
    let mut replies = rt.block_on(async {
        let mut client = tessera_proto::CoordinatorClient::new(channel(port).await);
        let mut open = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        open.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        client.heartbeats(open).await.unwrap().into_inner()
    });
    let out = wait(c, Duration::from_secs(30), "the coordinator with a heartbeat stream open");
    assert!(!out.status.success(), "the job failed (nobody joined)");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("gave up waiting for workers"), "{log}");
    assert!(log.contains("clients still connected at the end"), "{log}");
    // The stream ended with the coordinator (the sender is still open here).
    let end = rt.block_on(replies.message());
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    drop(beats);
}

/// A client that made a call and keeps its connection, idle, on a runtime
/// that keeps running (as a monitoring tool's would): the coordinator's
/// graceful stop tells it to go away, its connection task closes, and the
/// coordinator exits at once, without the forced close of `STOP_GRACE`.
#[test]
fn an_idle_client_on_a_running_runtime_does_not_delay_the_exit() {
    let (_tmp, c, port) = start("join_timeout_s = 1", &[]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let _client = rt.block_on(async {
        let mut client = tessera_proto::CoordinatorClient::new(channel(port).await);
        let mut req = Request::new(StatusRequest::default());
        req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        client.get_status(req).await.unwrap();
        client
    });
    let t0 = std::time::Instant::now();
    let out = wait(c, Duration::from_secs(30), "the coordinator with an idle client");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("gave up waiting for workers"), "{log}");
    assert!(!log.contains("clients still connected at the end"), "{log}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
}
