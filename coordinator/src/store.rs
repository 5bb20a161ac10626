//! The coordinator's durable job state (docs/DESIGN.md section 5): generation,
//! restarts, committed checkpoints, progress. It lives in an embedded
//! transactional store (redb) in the job's state directory, so a
//! coordinator killed at any moment and started again on the same directory
//! knows where the job was: it starts a later generation than any worker can
//! still speak for, and keeps counting restarts against the budget.

use anyhow::{bail, Context, Result};
use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("job");
const KEY: &str = "job";
pub const FILE_NAME: &str = "coordinator.redb";

/// What survives a coordinator restart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredJob {
    /// The job's identity: a state directory serves one job.
    pub seed: u64,
    pub global_batch: u32,
    pub generation: u64,
    /// Recoveries from a failed worker (counted against cluster.max_restarts).
    pub restarts: u32,
    /// Times a coordinator started on this state directory after the first.
    pub coordinator_restarts: u32,
    /// Steps of the committed checkpoints, oldest first.
    pub committed: Vec<u64>,
    /// Steps every rank had reported at the last change recorded (a
    /// commit or a new generation; not every step, which would put an
    /// fsync on the coordinator's hot path).
    pub steps_done: u64,
}

pub struct JobStore {
    db: Database,
    path: PathBuf,
}

impl JobStore {
    /// Opens (or creates) the store in `dir`. A store held by another
    /// running coordinator is refused: two coordinators must never drive
    /// one job.
    pub fn open(dir: &Path) -> Result<(Self, Option<StoredJob>)> {
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "{} is in use by another coordinator: one coordinator per state directory",
                path.display()
            ),
            e => anyhow::anyhow!("cannot open the job store {}: {e}", path.display()),
        })?;
        let store = JobStore { db, path };
        let job = store.read()?;
        Ok((store, job))
    }

    fn read(&self) -> Result<Option<StoredJob>> {
        let ctx = || format!("cannot read the job store {}", self.path.display());
        let txn = self.db.begin_read().with_context(ctx)?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e).with_context(ctx),
        };
        let Some(bytes) = table.get(KEY).with_context(ctx)? else { return Ok(None) };
        let job = serde_json::from_slice(bytes.value())
            .with_context(|| format!("{}: the job record is not readable", self.path.display()))?;
        Ok(Some(job))
    }

    /// Replaces the record in one transaction: durable when this returns.
    pub fn save(&self, job: &StoredJob) -> Result<()> {
        let ctx = || format!("cannot write the job store {}", self.path.display());
        let bytes = serde_json::to_vec(job)?;
        let txn = self.db.begin_write().with_context(ctx)?;
        {
            let mut table = txn.open_table(TABLE).with_context(ctx)?;
            table.insert(KEY, bytes.as_slice()).with_context(ctx)?;
        }
        txn.commit().with_context(ctx)
    }
}

/// Refuses to drive a stored job with a config of another identity: its
/// checkpoints and data order belong to the stored seed and global batch.
pub fn check_identity(stored: &StoredJob, seed: u64, global_batch: u32, dir: &Path) -> Result<()> {
    if (stored.seed, stored.global_batch) != (seed, global_batch) {
        bail!(
            "the state directory {} holds a job with train.seed = {} and a global batch of {}, but this config has \
             seed {seed} and global batch {global_batch}: use another --out for another job",
            dir.display(),
            stored.seed,
            stored.global_batch
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_record_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (store, none) = JobStore::open(dir.path()).unwrap();
        assert_eq!(none, None, "a new store is empty");
        let job = StoredJob {
            seed: 3,
            global_batch: 10,
            generation: 4,
            restarts: 2,
            committed: vec![2, 4],
            ..Default::default()
        };
        store.save(&job).unwrap();
        let later = StoredJob { steps_done: 5, ..job.clone() };
        store.save(&later).unwrap();
        drop(store);
        let (_, got) = JobStore::open(dir.path()).unwrap();
        assert_eq!(got, Some(later));
    }

    #[test]
    fn a_second_coordinator_on_one_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = JobStore::open(dir.path()).unwrap();
        let e = JobStore::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("in use by another coordinator"), "{e}");
    }

    #[test]
    fn another_job_is_refused() {
        let stored = StoredJob { seed: 3, global_batch: 10, ..Default::default() };
        assert!(check_identity(&stored, 3, 10, Path::new("/x")).is_ok());
        let e = check_identity(&stored, 4, 10, Path::new("/x")).unwrap_err().to_string();
        assert!(e.contains("train.seed = 3") && e.contains("seed 4"), "{e}");
    }
}
