//! The worker's side of the coordinator protocol: a blocking facade over the
//! tonic client, usable from the step loop, the data threads and the
//! heartbeat thread at once (each call runs on one shared runtime).

use crate::auth::{JobToken, SESSION_KEY};
use crate::tls::ClientTls;
use crate::v1::{
    Assignment, AssignmentRequest, CheckpointAck, CheckpointPart, HeartbeatReply, HeartbeatRequest, JoinReply,
    JoinRequest, LeaveRequest, RendezvousReply, RendezvousRequest, StepAck, StepReport,
};
use crate::CoordinatorClient;
use anyhow::{anyhow, bail, Context, Result};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Longest any one call may take; Rendezvous itself answers within 10 s.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How a client of the coordinator proves itself (the flags `worker` and
/// `coordinator status` share).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ClientArgs {
    /// A file holding the job's token (else the TESSERA_JOB_TOKEN
    /// environment variable; neither: no token).
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// The CA (PEM) of the coordinator's TLS certificate; the coordinator
    /// URL is then https://.
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// This client's certificate and key (PEM), for a coordinator that
    /// asks for them (mutual TLS).
    #[arg(long)]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ClientArgs {
    /// The token and TLS settings the flags (and the environment) name.
    pub fn resolve(self) -> Result<(Option<JobToken>, Option<ClientTls>)> {
        let token = JobToken::load(self.token_file.as_deref())?;
        Ok((token, ClientTls::from_flags(self.tls_ca, self.tls_cert, self.tls_key)?))
    }
}

/// What every call carries: the job token, and after Join the session
/// secret that binds the calls to this worker's rank.
#[derive(Clone)]
struct Credentials {
    token: Option<AsciiMetadataValue>,
    session: Arc<Mutex<Option<AsciiMetadataValue>>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(s) = self.session.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            req.metadata_mut().insert(SESSION_KEY, s);
        }
        Ok(req)
    }
}

type Inner = CoordinatorClient<InterceptedService<Channel, Credentials>>;

#[derive(Clone)]
pub struct Client {
    url: String,
    rt: Arc<tokio::runtime::Runtime>,
    inner: Inner,
    session: Arc<Mutex<Option<AsciiMetadataValue>>>,
}

impl Client {
    /// Connects to the coordinator, retrying with exponential backoff (a
    /// worker may start before the coordinator is up) until `patience` runs out.
    pub fn connect(url: &str, patience: Duration, token: Option<&JobToken>, tls: Option<&ClientTls>) -> Result<Self> {
        let token = token
            .map(|t| MetadataValue::try_from(t.bearer()))
            .transpose()
            .map_err(|_| anyhow!("the job token cannot travel in a header"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| anyhow!("coordinator URL {url:?} is not valid: {e} (expected e.g. http://head-node:29500)"))?
            .timeout(CALL_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let endpoint = match tls {
            Some(tls) => endpoint
                .tls_config(tls.config(url)?)
                .map_err(|e| anyhow!("TLS settings for {url}: {}", source_chain(&e)))?,
            None => endpoint,
        };
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let channel = loop {
            match rt.block_on(endpoint.connect()) {
                Ok(c) => break c,
                Err(e) => {
                    if start.elapsed() + delay > patience {
                        let why = source_chain(&e);
                        let hint = if why.contains("certificate") {
                            "the coordinator's TLS certificate is not signed by the --tls-ca given, or not for this host name"
                        } else {
                            "is it running, and is the address right?"
                        };
                        bail!(
                            "cannot reach the coordinator at {url} after {:.0} s: {why} ({hint})",
                            start.elapsed().as_secs_f64(),
                        );
                    }
                    tracing::info!(%url, retry_in_ms = delay.as_millis() as u64, "coordinator not reachable yet");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let session = Arc::new(Mutex::new(None));
        let inner = CoordinatorClient::with_interceptor(channel, Credentials { token, session: session.clone() });
        Ok(Client { url: url.to_string(), rt: Arc::new(rt), inner, session })
    }

    /// Later calls carry the session secret a Join returned.
    fn joined(&self, reply: JoinReply) -> Result<JoinReply> {
        let secret = MetadataValue::try_from(reply.session_secret.as_str())
            .map_err(|_| anyhow!("the coordinator sent a session secret that is not a header value"))?;
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(secret);
        Ok(reply)
    }

    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(Inner) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt.block_on(f(self.inner.clone())).map(|r| r.into_inner()).map_err(|s| refusal(&self.url, what, &s))
    }

    pub fn join(&self, req: JoinRequest) -> Result<JoinReply> {
        self.call("join", |mut c| async move { c.join(req).await }).and_then(|r| self.joined(r))
    }

    /// Joins, retrying with backoff while the coordinator is unreachable (a
    /// restarted coordinator coming back) or the rank is still held by a
    /// worker about to be declared dead (a replacement started early).
    /// Refusals (a wrong rank, another protocol) are final.
    pub fn join_patiently(&self, req: JoinRequest, patience: Duration) -> Result<JoinReply> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let req = req.clone();
            let status = match self.rt.block_on(async { self.inner.clone().join(req).await }) {
                Ok(r) => return self.joined(r.into_inner()),
                Err(s) => s,
            };
            let retry = matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded);
            if !retry || start.elapsed() + delay > patience {
                return Err(refusal(&self.url, "join", &status));
            }
            tracing::info!(retry_in_ms = delay.as_millis() as u64, reason = %status.message(), "cannot join yet");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
    pub fn rendezvous(&self, req: RendezvousRequest) -> Result<RendezvousReply> {
        self.call("rendezvous", |mut c| async move { c.rendezvous(req).await })
    }
    pub fn assignment(&self, req: AssignmentRequest) -> Result<Assignment> {
        self.call("assignment", |mut c| async move { c.get_assignment(req).await })
    }
    pub fn report(&self, req: StepReport) -> Result<StepAck> {
        self.call("step report", |mut c| async move { c.report_step(req).await })
    }
    /// Opens this worker's heartbeat stream (one per generation; open a new
    /// one after any error).
    pub fn heartbeats(&self) -> Result<Heartbeats> {
        let (beats, rx) = tokio::sync::mpsc::channel(1);
        let replies =
            self.call("heartbeat stream", |mut c| async move { c.heartbeats(ReceiverStream::new(rx)).await })?;
        Ok(Heartbeats { url: self.url.clone(), rt: self.rt.clone(), beats, replies })
    }
    pub fn commit_checkpoint(&self, req: CheckpointPart) -> Result<CheckpointAck> {
        self.call("checkpoint part", |mut c| async move { c.commit_checkpoint(req).await })
    }
    pub fn leave(&self, req: LeaveRequest) -> Result<()> {
        self.call("leave", |mut c| async move { c.leave(req).await }).map(|_| ())
    }
}

/// A worker's open heartbeat stream: one small message each way per beat.
pub struct Heartbeats {
    url: String,
    rt: Arc<tokio::runtime::Runtime>,
    beats: tokio::sync::mpsc::Sender<HeartbeatRequest>,
    replies: tonic::Streaming<HeartbeatReply>,
}

impl Heartbeats {
    /// Sends one beat and waits up to `patience` for its answer. After an
    /// error the stream is spent: a late answer would be taken for the
    /// next beat's.
    pub fn beat(mut self, req: HeartbeatRequest, patience: Duration) -> Result<(HeartbeatReply, Self)> {
        let url = &self.url;
        let answer = self.rt.block_on(async {
            self.beats.send(req).await.map_err(|_| anyhow!("the heartbeat stream to {url} is closed"))?;
            match tokio::time::timeout(patience, self.replies.message()).await {
                Err(_) => bail!("coordinator {url} did not answer a heartbeat within {:.1} s", patience.as_secs_f64()),
                Ok(Ok(Some(reply))) => Ok(reply),
                Ok(Ok(None)) => bail!("coordinator {url} closed the heartbeat stream"),
                Ok(Err(status)) => Err(refusal(url, "heartbeat", &status)),
            }
        })?;
        Ok((answer, self))
    }
}

/// "transport error: connection refused" rather than only the outer layer.
/// Layers that repeat their source's text are said once.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

/// A refused call, with a hint where the status alone says little: a TLS
/// handshake the coordinator broke off arrives as a bare transport error.
fn refusal(url: &str, what: &str, s: &tonic::Status) -> anyhow::Error {
    let mut msg = format!("coordinator {url} refused {what}: {} ({:?})", s.message(), s.code());
    if s.code() == tonic::Code::Unknown && s.message().contains("transport error") && url.starts_with("https://") {
        msg.push_str(
            " (a coordinator with mutual TLS drops a worker without a certificate signed by its --tls-client-ca: \
             give this worker --tls-cert and --tls-key)",
        );
    }
    anyhow!(msg)
}
