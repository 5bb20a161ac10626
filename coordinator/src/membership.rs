//! Who is in the job: rank assignment and the checks that keep two workers
//! from claiming one rank or one GPU. Pure state, no I/O, so tests drive it
//! directly.

use std::fmt;

/// What a worker says about itself when it joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinInfo {
    pub protocol_version: u32,
    pub rank: Option<u32>,
    pub host: String,
    /// "cpu" or "cuda:K".
    pub device: String,
    pub collective_addr: String,
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum JoinError {
    Protocol {
        theirs: u32,
        ours: u32,
    },
    RankOutOfRange {
        rank: u32,
        world_size: usize,
    },
    RankTaken {
        rank: u32,
        by: String,
    },
    /// Held by a member of this generation that has gone quiet: it will be
    /// declared dead (freeing the rank) or speak again. Worth retrying.
    RankBusy {
        rank: u32,
        by: String,
        silent_s: f64,
    },
    GpuTaken {
        host: String,
        device: String,
        rank: u32,
    },
    Full {
        world_size: usize,
    },
    BadDevice(String),
    /// The job has ended: finished, or failed (and why).
    Ended(String),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Protocol { theirs, ours } => write!(
                f,
                "worker speaks protocol v{theirs} but this coordinator speaks v{ours}: run the same Tessera version on both"
            ),
            JoinError::RankOutOfRange { rank, world_size } => {
                write!(f, "rank {rank} is out of range: the job has world_size {world_size} (ranks 0..{world_size})")
            }
            JoinError::RankTaken { rank, by } => write!(f, "rank {rank} is already taken by {by}"),
            JoinError::RankBusy { rank, by, silent_s } => write!(
                f,
                "rank {rank} is held by {by}, silent for {silent_s:.1} s: retry once the coordinator declares it dead"
            ),
            JoinError::GpuTaken { host, device, rank } => {
                write!(f, "{device} on host {host} is already used by rank {rank}: one rank per GPU")
            }
            JoinError::Full { world_size } => write!(f, "the job is full: all {world_size} ranks have joined"),
            JoinError::BadDevice(d) => write!(f, "device {d:?} is not `cpu` or `cuda:K`"),
            JoinError::Ended(why) => write!(f, "{why}"),
        }
    }
}

/// A joined worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub info: JoinInfo,
    /// Seconds since the coordinator started, at the last sign of life.
    pub last_seen: f64,
    pub left: bool,
    /// The generation it last joined: a survivor of an aborted generation
    /// keeps its rank but counts only once it joins the new one.
    pub generation: u64,
    /// Names this membership (rendezvous finds the member by it).
    pub id: u64,
    /// Proves a call comes from this worker (kept while the process lives,
    /// across generations).
    pub secret: String,
}

impl Member {
    fn describe(&self) -> String {
        format!("{} pid {} ({})", self.info.host, self.info.pid, self.info.device)
    }
}

/// The ranks of one generation.
#[derive(Clone, Debug)]
pub struct Membership {
    pub world_size: usize,
    pub generation: u64,
    pub members: Vec<Option<Member>>,
    /// The NCCL unique id rank 0 created for this generation (GPU jobs).
    pub nccl_id: Vec<u8>,
    /// A member silent this long may be replaced (from an aborted
    /// generation) or is reported busy (from this one) rather than taken.
    pub quiet_after_s: f64,
    joins: u64,
}

impl Membership {
    #[cfg(test)]
    pub fn new(world_size: usize) -> Self {
        Self::at_generation(world_size, 1)
    }

    pub fn at_generation(world_size: usize, generation: u64) -> Self {
        Membership {
            world_size,
            generation,
            members: vec![None; world_size],
            nccl_id: Vec::new(),
            quiet_after_s: f64::INFINITY,
            joins: 0,
        }
    }

    /// Admits a worker and returns its rank. Joining again from the same
    /// host and process (a retried Join whose reply was lost, or a survivor
    /// of an aborted generation) returns the same rank.
    pub fn join(&mut self, info: JoinInfo, now: f64) -> Result<u32, JoinError> {
        if info.protocol_version != tessera_proto::PROTOCOL_VERSION {
            return Err(JoinError::Protocol { theirs: info.protocol_version, ours: tessera_proto::PROTOCOL_VERSION });
        }
        let gpu = parse_device(&info.device)?;
        let generation = self.generation;
        if let Some((r, m)) = self.find(|_, m| m.info.host == info.host && m.info.pid == info.pid && !m.left) {
            if info.rank.is_none_or(|want| want == r) {
                let id = self.next_id();
                if let Some(Some(m)) = self.members.get_mut(r as usize) {
                    m.last_seen = now;
                    m.info.collective_addr = info.collective_addr;
                    if m.generation != generation {
                        m.generation = generation;
                        m.id = id;
                    }
                }
                return Ok(r);
            }
            return Err(JoinError::RankTaken { rank: info.rank.unwrap_or(r), by: m.describe() });
        }
        let rank = match info.rank {
            Some(r) if r as usize >= self.world_size => {
                return Err(JoinError::RankOutOfRange { rank: r, world_size: self.world_size })
            }
            Some(r) => {
                if let Some(Some(m)) = self.members.get(r as usize) {
                    let silent_s = now - m.last_seen;
                    match (m.left, silent_s > self.quiet_after_s, m.generation == generation) {
                        // Free, or a quiet member of an aborted generation: a replacement.
                        (true, _, _) | (false, true, false) => {}
                        // Quiet in this generation: it will be declared dead, or speak again.
                        (false, true, true) => return Err(JoinError::RankBusy { rank: r, by: m.describe(), silent_s }),
                        (false, false, _) => return Err(JoinError::RankTaken { rank: r, by: m.describe() }),
                    }
                }
                r
            }
            None => match self.members.iter().position(|m| m.as_ref().is_none_or(|m| m.left)) {
                Some(r) => r as u32,
                None => return Err(JoinError::Full { world_size: self.world_size }),
            },
        };
        if let Some(k) = gpu {
            let same_gpu = |m: &Member| {
                !m.left && m.info.host == info.host && parse_device(&m.info.device).ok().flatten() == Some(k)
            };
            // The member this one replaces does not count.
            if let Some((r, _)) = self.find(|r, m| r != rank && same_gpu(m)) {
                return Err(JoinError::GpuTaken { host: info.host, device: info.device, rank: r });
            }
        }
        let id = self.next_id();
        let secret = tessera_proto::auth::new_session_secret();
        self.members[rank as usize] = Some(Member { info, last_seen: now, left: false, generation, id, secret });
        Ok(rank)
    }

    /// Unique within a coordinator's life; the generation in the high bits
    /// keeps ids of different generations apart.
    fn next_id(&mut self) -> u64 {
        self.joins += 1;
        (self.generation << 32) | self.joins
    }

    /// Whether `secret` is the session of the worker that holds `rank`.
    pub fn authorize(&self, rank: u32, secret: &str) -> bool {
        match self.members.get(rank as usize) {
            Some(Some(m)) => tessera_proto::auth::same_bytes(m.secret.as_bytes(), secret.as_bytes()),
            _ => false,
        }
    }

    /// The current member named `id`, with its rank.
    pub fn by_id(&self, id: u64) -> Option<(u32, &Member)> {
        self.find(|_, m| m.id == id && !m.left && m.generation == self.generation)
    }

    /// Starts the next generation: nobody counts as joined until they join
    /// it again (survivors keep their ranks), and the NCCL id is renewed.
    pub fn next_generation(&mut self) {
        self.generation += 1;
        self.nccl_id.clear();
    }

    /// An elastic job going on with the members that joined this
    /// generation: they are renumbered 0..n in the order of their old
    /// ranks. Returns the new world size.
    pub fn shrink_to_joined(&mut self) -> usize {
        let g = self.generation;
        let kept: Vec<Option<Member>> =
            self.members.drain(..).filter(|m| m.as_ref().is_some_and(|m| !m.left && m.generation == g)).collect();
        self.world_size = kept.len();
        self.members = kept;
        self.world_size
    }

    fn find(&self, pred: impl Fn(u32, &Member) -> bool) -> Option<(u32, &Member)> {
        self.members
            .iter()
            .enumerate()
            .find_map(|(r, m)| m.as_ref().filter(|m| pred(r as u32, m)).map(|m| (r as u32, m)))
    }

    /// Members of the current generation.
    pub fn joined(&self) -> usize {
        self.members.iter().filter(|m| m.as_ref().is_some_and(|m| !m.left && m.generation == self.generation)).count()
    }

    /// Every rank has joined (and, in a GPU job, rank 0 has sent the NCCL id).
    pub fn complete(&self) -> bool {
        self.joined() == self.world_size && (!self.uses_gpus() || !self.nccl_id.is_empty())
    }

    pub fn uses_gpus(&self) -> bool {
        self.members.iter().flatten().any(|m| m.info.device.starts_with("cuda"))
    }

    /// Ring addresses by rank (complete memberships only).
    pub fn ring_peers(&self) -> Vec<String> {
        self.members.iter().map(|m| m.as_ref().map(|m| m.info.collective_addr.clone()).unwrap_or_default()).collect()
    }

    /// Records a sign of life from `rank` of `generation`; false when that
    /// is not a member.
    pub fn touch(&mut self, rank: u32, generation: u64, now: f64) -> bool {
        match self.members.get_mut(rank as usize) {
            Some(Some(m)) if !m.left && m.generation == generation => {
                m.last_seen = now;
                true
            }
            _ => false,
        }
    }

    pub fn leave(&mut self, rank: u32) {
        if let Some(Some(m)) = self.members.get_mut(rank as usize) {
            m.left = true;
        }
    }

    /// Every rank that joined has left.
    pub fn all_left(&self) -> bool {
        self.members.iter().all(|m| m.as_ref().is_some_and(|m| m.left))
    }
}

/// `cpu` -> None, `cuda:K` -> Some(K).
fn parse_device(d: &str) -> Result<Option<u32>, JoinError> {
    match d.strip_prefix("cuda:") {
        Some(k) => k.parse().map(Some).map_err(|_| JoinError::BadDevice(d.to_string())),
        None if d == "cpu" => Ok(None),
        None => Err(JoinError::BadDevice(d.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: Option<u32>, host: &str, device: &str, pid: u32) -> JoinInfo {
        JoinInfo {
            protocol_version: tessera_proto::PROTOCOL_VERSION,
            rank,
            host: host.into(),
            device: device.into(),
            collective_addr: format!("{host}:{}", 4000 + pid),
            pid,
        }
    }

    #[test]
    fn assigns_free_ranks_and_honours_requested_ones() {
        let mut m = Membership::new(3);
        assert_eq!(m.join(info(Some(2), "a", "cpu", 1), 0.0), Ok(2));
        assert_eq!(m.join(info(None, "a", "cpu", 2), 0.0), Ok(0));
        assert!(!m.complete());
        assert_eq!(m.join(info(None, "b", "cpu", 3), 0.0), Ok(1));
        assert!(m.complete());
        assert_eq!(m.ring_peers(), vec!["a:4002", "b:4003", "a:4001"]);
        assert_eq!(m.join(info(None, "c", "cpu", 4), 0.0), Err(JoinError::Full { world_size: 3 }));
    }

    #[test]
    fn refuses_duplicate_and_out_of_range_ranks_and_shared_gpus() {
        let mut m = Membership::new(2);
        assert_eq!(m.join(info(Some(0), "a", "cuda:0", 1), 0.0), Ok(0));
        let e = m.join(info(Some(0), "b", "cuda:0", 2), 0.0).unwrap_err();
        assert!(matches!(e, JoinError::RankTaken { rank: 0, .. }), "{e}");
        assert!(e.to_string().contains("a pid 1"), "{e}");
        let e = m.join(info(Some(2), "b", "cuda:0", 2), 0.0).unwrap_err();
        assert_eq!(e, JoinError::RankOutOfRange { rank: 2, world_size: 2 });
        let e = m.join(info(Some(1), "a", "cuda:0", 3), 0.0).unwrap_err();
        assert!(matches!(e, JoinError::GpuTaken { rank: 0, .. }), "{e}");
        // The same GPU index on another host is another GPU.
        assert_eq!(m.join(info(Some(1), "b", "cuda:0", 3), 0.0), Ok(1));
    }

    #[test]
    fn refuses_other_protocol_versions_and_bad_devices() {
        let mut m = Membership::new(2);
        let mut i = info(None, "a", "cpu", 1);
        i.protocol_version += 1;
        let e = m.join(i, 0.0).unwrap_err();
        assert!(e.to_string().contains("protocol"), "{e}");
        let e = m.join(info(None, "a", "gpu0", 1), 0.0).unwrap_err();
        assert_eq!(e, JoinError::BadDevice("gpu0".into()));
        assert_eq!(m.joined(), 0);
    }

    #[test]
    fn a_retried_join_gets_the_same_rank_and_a_left_rank_can_be_rejoined() {
        let mut m = Membership::new(2);
        assert_eq!(m.join(info(None, "a", "cpu", 1), 0.0), Ok(0));
        let secret = m.members[0].as_ref().unwrap().secret.clone();
        assert_eq!(m.join(info(None, "a", "cpu", 1), 1.0), Ok(0));
        assert_eq!(m.joined(), 1);
        assert!(m.authorize(0, &secret), "a retried join keeps the session");
        assert!(!m.authorize(1, &secret) && !m.authorize(0, "0123"), "another rank, another secret");
        m.leave(0);
        assert_eq!(m.join(info(Some(0), "c", "cpu", 9), 2.0), Ok(0));
        assert!(!m.authorize(0, &secret), "the new holder has a new session");
    }

    #[test]
    fn a_gpu_job_is_complete_only_with_the_nccl_id() {
        let mut m = Membership::new(1);
        m.join(info(Some(0), "a", "cuda:1", 1), 0.0).unwrap();
        assert!(!m.complete());
        m.nccl_id = vec![7; 128];
        assert!(m.complete());
    }
}
