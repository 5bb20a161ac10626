//! What the coordinator accepts before a handler runs: the job token, and a
//! request rate per peer. A peer here is a client connection (its address
//! and port): one worker process, however many threads it calls from. A
//! peer over its rate gets RESOURCE_EXHAUSTED and nothing else happens, so
//! a runaway client slows only itself. A message on a stream (a heartbeat)
//! counts as a request too: the service checks those itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tessera_proto::auth::JobToken;
use tonic::{Request, Status};

/// A token bucket per peer: `rate` requests a second on average, bursts of
/// up to `burst`.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    peers: Mutex<HashMap<SocketAddr, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Peers kept before idle ones are forgotten (a bound on memory, not on peers).
const MAX_TRACKED: usize = 65_536;

impl RateLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        RateLimiter { rate, burst: burst.max(1.0), peers: Mutex::new(HashMap::new()) }
    }

    /// Takes one request's token from `peer`'s bucket; false when empty.
    pub fn admit(&self, peer: SocketAddr, now: Instant) -> bool {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= MAX_TRACKED && !peers.contains_key(&peer) {
            // Full buckets hold no state worth keeping.
            let (rate, burst) = (self.rate, self.burst);
            peers.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = peers.entry(peer).or_insert(Bucket { tokens: self.burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Admits one request from `peer` now, or says it is over its rate.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Status> {
        if self.admit(peer, Instant::now()) {
            return Ok(());
        }
        Err(Status::resource_exhausted(format!(
            "{peer} is over the coordinator's rate limit of {} requests/s: slow down",
            self.rate
        )))
    }
}

/// The checks every call goes through, in order: the job token (when the
/// job has one), then the peer's rate.
pub fn gate(token: Option<JobToken>, limiter: Arc<RateLimiter>) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| -> Result<Request<()>, Status> {
        if let Some(t) = &token {
            if !t.accepts(req.metadata().get("authorization").and_then(|v| v.to_str().ok())) {
                return Err(Status::unauthenticated(
                    "missing or wrong job token: give the worker the job's token (TESSERA_JOB_TOKEN or --token-file)",
                ));
            }
        }
        if let Some(peer) = req.remote_addr() {
            limiter.check(peer)?;
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_peer_gets_its_burst_then_its_rate() {
        let l = RateLimiter::new(10.0, 5.0);
        let (a, b): (SocketAddr, SocketAddr) = ("10.0.0.1:5000".parse().unwrap(), "10.0.0.2:5000".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| l.admit(a, t0)).count(), 5, "the burst");
        assert!(l.admit(b, t0), "another peer has its own bucket");
        assert!(!l.admit(a, t0 + Duration::from_millis(50)), "half a token");
        assert!(l.admit(a, t0 + Duration::from_millis(100)), "one token after 0.1 s at 10/s");
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| l.admit(a, later)).count(), 5, "refills to the burst, no more");
    }

    #[test]
    fn the_gate_checks_the_token_then_the_rate() {
        let token = JobToken::new("0123456789abcdef0123", "t").unwrap();
        let mut gate = gate(Some(token.clone()), Arc::new(RateLimiter::new(1.0, 1.0)));
        use tonic::service::Interceptor;
        let with = |auth: Option<&str>| {
            let mut r = Request::new(());
            if let Some(a) = auth {
                r.metadata_mut().insert("authorization", a.parse().unwrap());
            }
            r
        };
        assert_eq!(gate.call(with(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(gate.call(with(Some("Bearer nope"))).unwrap_err().code(), tonic::Code::Unauthenticated);
        // No remote address (an in-process call): no rate to keep.
        assert!(gate.call(with(Some(&token.bearer()))).is_ok());
        assert!(gate.call(with(Some(&token.bearer()))).is_ok());
    }
}
