//! The coordinator's Prometheus endpoint: `GET /metrics` on
//! `--metrics-listen`, in the Prometheus text format (version 0.0.4).
//!
//! Step values are set as steps are summarized (`observe_step`, called from
//! the coordinator's `on_step`) and go back with a recovery (`rewound`);
//! membership, generation and restarts are read from the job state on each
//! scrape (`observe_job`), so they are never stale.

use crate::progress::StepSummary;
use crate::state::JobState;
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::{prometheus_text, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use tessera_proto::auth::JobToken;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabel {
    rank: u32,
}

/// What a scrape reads from the job state (copied under its lock, which is
/// released before anything is encoded).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSnapshot {
    pub steps_done: u64,
    pub total_steps: u64,
    pub generation: u64,
    pub world_size: usize,
    pub joined: usize,
    pub restarts: u32,
    pub max_restarts: u32,
    pub last_checkpoint: Option<u64>,
}

impl JobSnapshot {
    pub fn of(st: &JobState) -> Self {
        JobSnapshot {
            steps_done: st.steps_done(),
            total_steps: st.spec.total_steps,
            generation: st.members.generation,
            world_size: st.members.world_size,
            joined: st.members.joined(),
            restarts: st.restarts,
            max_restarts: st.policy.max_restarts,
            last_checkpoint: st.committed.last().copied(),
        }
    }
}

/// The job's metrics, all named `tessera_*`.
pub struct Metrics {
    registry: Registry,
    step: Gauge,
    total_steps: Gauge,
    loss: FloatGauge,
    tokens_per_s: FloatGauge,
    tiles_per_s: FloatGauge,
    steps_per_s: FloatGauge,
    rank_step_s: Family<RankLabel, FloatGauge>,
    rank_compute_s: Family<RankLabel, FloatGauge>,
    rank_straggler: Family<RankLabel, Gauge>,
    stragglers: Gauge,
    plan_imbalance: FloatGauge,
    compute_imbalance: FloatGauge,
    bad_samples: Counter,
    restarts: Gauge,
    max_restarts: Gauge,
    generation: Gauge,
    world_size: Gauge,
    workers_joined: Gauge,
    checkpoint_step: Gauge,
    /// Ranks in the last summary: series of ranks beyond an elastic shrink
    /// are removed rather than left at their last value.
    ranks: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("tessera");
        let m = Metrics {
            registry: Registry::default(),
            step: Gauge::default(),
            total_steps: Gauge::default(),
            loss: FloatGauge::default(),
            tokens_per_s: FloatGauge::default(),
            tiles_per_s: FloatGauge::default(),
            steps_per_s: FloatGauge::default(),
            rank_step_s: Family::default(),
            rank_compute_s: Family::default(),
            rank_straggler: Family::default(),
            stragglers: Gauge::default(),
            plan_imbalance: FloatGauge::default(),
            compute_imbalance: FloatGauge::default(),
            bad_samples: Counter::default(),
            restarts: Gauge::default(),
            max_restarts: Gauge::default(),
            generation: Gauge::default(),
            world_size: Gauge::default(),
            workers_joined: Gauge::default(),
            checkpoint_step: Gauge::default(),
            ranks: AtomicUsize::new(0),
        };
        r.register("step", "Steps done (every rank has reported them)", m.step.clone());
        r.register("total_steps", "Steps the job trains", m.total_steps.clone());
        r.register("loss", "Mean loss of the last step's global batch", m.loss.clone());
        r.register("tokens_per_second", "LLM tokens per second in the last step", m.tokens_per_s.clone());
        r.register("tiles_per_second", "S2 tiles per second in the last step", m.tiles_per_s.clone());
        r.register("steps_per_second", "One over the last step's wall time (slowest rank)", m.steps_per_s.clone());
        r.register_with_unit("rank_step", "Wall time of each rank's last step", Unit::Seconds, m.rank_step_s.clone());
        r.register_with_unit(
            "rank_compute",
            "Compute time of each rank's last step",
            Unit::Seconds,
            m.rank_compute_s.clone(),
        );
        r.register(
            "rank_straggler",
            "1 when the rank was slower than cluster.straggler_factor times the median in the last step",
            m.rank_straggler.clone(),
        );
        r.register("stragglers", "Ranks flagged as stragglers in the last step", m.stragglers.clone());
        r.register(
            "plan_imbalance",
            "Planned cost of the most loaded rank over the mean, less one (last step)",
            m.plan_imbalance.clone(),
        );
        r.register(
            "compute_imbalance",
            "Compute time of the slowest rank over the mean, less one (last step)",
            m.compute_imbalance.clone(),
        );
        r.register(
            "bad_samples",
            "Unreadable samples skipped (steps trained again after a recovery count again)",
            m.bad_samples.clone(),
        );
        r.register("restarts", "Recoveries over the job's life", m.restarts.clone());
        r.register("max_restarts", "Recoveries allowed (cluster.max_restarts)", m.max_restarts.clone());
        r.register("generation", "The current generation of the job's membership", m.generation.clone());
        r.register("world_size", "Ranks the current generation trains with", m.world_size.clone());
        r.register("workers_joined", "Ranks that have joined the current generation", m.workers_joined.clone());
        r.register(
            "checkpoint_step",
            "Steps done at the last committed checkpoint (0: none)",
            m.checkpoint_step.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// A step every rank has reported.
    pub fn observe_step(&self, s: &StepSummary) {
        self.set_last_step(Some(s));
        self.bad_samples.inc_by(s.bad_samples);
        let n = s.compute_s.len().max(s.step_s.len());
        for rank in 0..n {
            let label = RankLabel { rank: rank as u32 };
            if let Some(&t) = s.compute_s.get(rank) {
                self.rank_compute_s.get_or_create(&label).set(t);
            }
            if let Some(&t) = s.step_s.get(rank) {
                self.rank_step_s.get_or_create(&label).set(t);
            }
            self.rank_straggler.get_or_create(&label).set(i64::from(s.stragglers.contains(&(rank as u32))));
        }
        let before = self.ranks.swap(n, Ordering::Relaxed);
        for rank in n..before {
            let label = RankLabel { rank: rank as u32 };
            self.rank_compute_s.remove(&label);
            self.rank_step_s.remove(&label);
            self.rank_straggler.remove(&label);
        }
    }

    /// A recovery went back to a checkpoint: `kept` are the steps before it.
    pub fn rewound(&self, kept: &[StepSummary]) {
        self.set_last_step(kept.last());
    }

    fn set_last_step(&self, s: Option<&StepSummary>) {
        let Some(s) = s else {
            self.step.set(0);
            return;
        };
        self.step.set(gauge_value(s.step + 1));
        self.loss.set(s.loss);
        self.tokens_per_s.set(s.tokens_per_s);
        self.tiles_per_s.set(s.tiles_per_s);
        self.steps_per_s.set(if s.seconds > 0.0 { 1.0 / s.seconds } else { 0.0 });
        self.plan_imbalance.set(s.plan_imbalance);
        self.compute_imbalance.set(s.compute_imbalance);
        self.stragglers.set(gauge_value(s.stragglers.len() as u64));
    }

    /// The job state's numbers, read at each scrape.
    pub fn observe_job(&self, j: &JobSnapshot) {
        self.step.set(gauge_value(j.steps_done));
        self.total_steps.set(gauge_value(j.total_steps));
        self.generation.set(gauge_value(j.generation));
        self.world_size.set(gauge_value(j.world_size as u64));
        self.workers_joined.set(gauge_value(j.joined as u64));
        self.restarts.set(i64::from(j.restarts));
        self.max_restarts.set(i64::from(j.max_restarts));
        self.checkpoint_step.set(gauge_value(j.last_checkpoint.unwrap_or(0)));
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).context("cannot encode the metrics")?;
        Ok(out)
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads the job state for a scrape.
pub type Snapshot = dyn Fn() -> JobSnapshot + Send + Sync;

struct App {
    metrics: Arc<Metrics>,
    snapshot: Box<Snapshot>,
    token: Option<JobToken>,
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes. With a
/// job token, a scrape must carry `Authorization: Bearer TOKEN`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    snapshot: Box<Snapshot>,
    token: Option<JobToken>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = Arc::new(App { metrics, snapshot, token });
    // The method router answers 405 (with Allow) for other methods, and HEAD
    // like GET without the body; the fallback answers 404 for other paths.
    let router = Router::new().route("/metrics", get(scrape)).fallback(not_found).with_state(app);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await.context("metrics server")
}

async fn scrape(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(t) = &app.token {
        if !t.accepts(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong job token: send `Authorization: Bearer TOKEN`\n",
            )
                .into_response();
        }
    }
    app.metrics.observe_job(&(app.snapshot)());
    match app.metrics.render() {
        Ok(body) => ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot render the metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the metrics\n").into_response()
        }
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{Read, Write};

    fn summary(step: u64) -> StepSummary {
        StepSummary {
            step,
            loss: 2.5,
            grad_norm: 1.0,
            lr_scale: 1.0,
            samples: 4,
            target_tokens: 40,
            llm_tokens: 400,
            tiles: 20,
            bad_samples: 1,
            truncated: 0,
            seconds: 0.5,
            tokens_per_s: 800.0,
            tiles_per_s: 40.0,
            plan_imbalance: 0.25,
            compute_imbalance: 0.125,
            comm_wait_s: 0.0,
            compute_s: vec![0.25, 0.375],
            step_s: vec![0.45, 0.5],
            rank_samples: vec![2, 2],
            stragglers: vec![1],
        }
    }

    /// Sample lines as name{labels} -> value; panics on a line that is not
    /// a comment or a well-formed sample.
    fn samples(text: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.starts_with("# UNIT ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            assert!(out.insert(series.to_string(), value).is_none(), "{series} twice");
        }
        out
    }

    #[test]
    fn a_step_and_the_job_state_become_samples() {
        let m = Metrics::new();
        m.observe_step(&summary(4));
        m.observe_step(&summary(5));
        m.observe_job(&JobSnapshot {
            steps_done: 6,
            total_steps: 40,
            generation: 2,
            world_size: 2,
            joined: 2,
            restarts: 1,
            max_restarts: 3,
            last_checkpoint: Some(4),
        });
        let text = m.render().unwrap();
        let s = samples(&text);
        let want = [
            ("tessera_step", 6.0),
            ("tessera_total_steps", 40.0),
            ("tessera_loss", 2.5),
            ("tessera_tokens_per_second", 800.0),
            ("tessera_tiles_per_second", 40.0),
            ("tessera_steps_per_second", 2.0),
            ("tessera_rank_step_seconds{rank=\"1\"}", 0.5),
            ("tessera_rank_compute_seconds{rank=\"0\"}", 0.25),
            ("tessera_rank_straggler{rank=\"0\"}", 0.0),
            ("tessera_rank_straggler{rank=\"1\"}", 1.0),
            ("tessera_stragglers", 1.0),
            ("tessera_plan_imbalance", 0.25),
            ("tessera_compute_imbalance", 0.125),
            ("tessera_bad_samples_total", 2.0),
            ("tessera_restarts", 1.0),
            ("tessera_max_restarts", 3.0),
            ("tessera_generation", 2.0),
            ("tessera_world_size", 2.0),
            ("tessera_workers_joined", 2.0),
            ("tessera_checkpoint_step", 4.0),
        ];
        for (k, v) in want {
            assert_eq!(s.get(k), Some(&v), "{k} in\n{text}");
        }
        assert!(text.contains("# TYPE tessera_bad_samples_total counter\n"), "{text}");
        assert!(text.contains("# TYPE tessera_rank_compute_seconds gauge\n"), "{text}");
    }

    /// A recovery takes the step gauge back; an elastic shrink drops the
    /// series of the ranks that are gone.
    #[test]
    fn a_rewind_and_a_shrink_are_followed() {
        let m = Metrics::new();
        for step in 0..6 {
            m.observe_step(&summary(step));
        }
        m.rewound(&[summary(0), summary(1), summary(2)]);
        assert_eq!(samples(&m.render().unwrap())["tessera_step"], 3.0);
        m.rewound(&[]);
        assert_eq!(samples(&m.render().unwrap())["tessera_step"], 0.0);
        let one = StepSummary { compute_s: vec![0.3], step_s: vec![0.4], stragglers: vec![], ..summary(3) };
        m.observe_step(&one);
        let s = samples(&m.render().unwrap());
        assert_eq!(s["tessera_rank_compute_seconds{rank=\"0\"}"], 0.3);
        assert!(!s.keys().any(|k| k.contains("rank=\"1\"")), "{s:?}");
    }

    /// One raw HTTP/1.1 exchange; returns the status code, the headers
    /// (lower-cased names) and the body.
    fn http(addr: std::net::SocketAddr, request: &str) -> (u16, BTreeMap<String, String>, String) {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut raw = String::new();
        c.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let code = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .map(|l| l.split_once(": ").unwrap())
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        (code, headers, body.to_string())
    }

    #[test]
    fn the_endpoint_answers_get_metrics_with_the_token_only() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        metrics.observe_step(&summary(6));
        let snapshot = Box::new(|| JobSnapshot { steps_done: 7, total_steps: 9, ..Default::default() });
        let token = JobToken::new("metrics-token-0123456789", "test").unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(serve(listener, metrics, snapshot, Some(token), async {
            let _ = stopped.await;
        }));
        let get = |path: &str, auth: &str| {
            http(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"))
        };
        let (code, h, body) = get("/metrics", "Authorization: Bearer metrics-token-0123456789\r\n");
        assert_eq!(code, 200, "{body}");
        assert_eq!(h["content-type"], "text/plain; version=0.0.4; charset=utf-8");
        assert_eq!(h["content-length"].parse::<usize>().unwrap(), body.len());
        let s = samples(&body);
        assert_eq!((s["tessera_step"], s["tessera_total_steps"]), (7.0, 9.0));
        let (code, h, _) = get("/metrics", "");
        assert_eq!((code, h["www-authenticate"].as_str()), (401, "Bearer"));
        assert_eq!(get("/metrics", "Authorization: Bearer metrics-token-0123456780\r\n").0, 401);
        assert_eq!(get("/other", "").0, 404);
        let (code, h, _) =
            http(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        assert_eq!(code, 405);
        assert!(h["allow"].contains("GET"), "{h:?}");
        stop.send(()).unwrap();
        rt.block_on(server).unwrap().unwrap();
    }
}
