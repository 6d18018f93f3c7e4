//! The preheat jobs of one daemon, in memory: each is PENDING until it ends once, in SUCCESS
//! or FAILURE, and is kept for its caller to read until newer jobs push it out.

use std::collections::BTreeMap;
use std::time::SystemTime;

use parking_lot::Mutex;

/// Jobs kept, finished or not; past it the oldest finished ones are forgotten.
pub const MAX_JOBS: usize = 256;
/// Jobs running at once; a new job past it is refused (the caller may try again later).
pub const MAX_PENDING: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Success,
    Failure,
}

impl State {
    /// As Dragonfly's open API (and so Harbor) spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "PENDING",
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
        }
    }
}

/// What a job has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// What it does now, in a few words.
    pub phase: String,
    pub blobs_total: u64,
    pub blobs_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Bytes this node fetched from the registry and from peers while the job ran.
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
    /// Peers that took their share of the blocks from this node, and how many were asked.
    pub nodes_spread: u64,
    pub nodes_asked: u64,
}

/// One blob preheated (or not), for the job's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobOutcome {
    /// The blob's URL on its registry.
    pub url: String,
    /// The peer address of the node that took it; `None`: the preheating node.
    pub node: Option<std::net::SocketAddr>,
    /// `None`: it is in the cluster; else why not.
    pub failure: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    /// The image, as `host/repository:tag` (never a credential).
    pub image: String,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub state: State,
    pub error: Option<String>,
    pub progress: Progress,
    pub blobs: Vec<BlobOutcome>,
}

/// Why a job could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooMany;

#[derive(Default)]
pub struct Jobs {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    last_id: u64,
    jobs: BTreeMap<u64, Job>,
}

impl Jobs {
    /// A new PENDING job for `image`; refused while [`MAX_PENDING`] jobs run.
    pub fn create(&self, image: String) -> Result<Job, TooMany> {
        let mut table = self.table.lock();
        let pending = table
            .jobs
            .values()
            .filter(|job| job.state == State::Pending)
            .count();
        if pending >= MAX_PENDING {
            return Err(TooMany);
        }
        while table.jobs.len() >= MAX_JOBS {
            let Some(oldest) = table
                .jobs
                .values()
                .find(|job| job.state != State::Pending)
                .map(|job| job.id)
            else {
                break;
            };
            table.jobs.remove(&oldest);
        }
        table.last_id += 1;
        let now = SystemTime::now();
        let job = Job {
            id: table.last_id,
            image,
            created_at: now,
            updated_at: now,
            state: State::Pending,
            error: None,
            progress: Progress {
                phase: "queued".into(),
                ..Progress::default()
            },
            blobs: Vec::new(),
        };
        table.jobs.insert(job.id, job.clone());
        Ok(job)
    }

    pub fn get(&self, id: u64) -> Option<Job> {
        self.table.lock().jobs.get(&id).cloned()
    }

    /// Changes a PENDING job's progress; a finished job stays as it ended.
    pub fn progress(&self, id: u64, change: impl FnOnce(&mut Progress)) {
        let mut table = self.table.lock();
        if let Some(job) = table
            .jobs
            .get_mut(&id)
            .filter(|job| job.state == State::Pending)
        {
            change(&mut job.progress);
            job.updated_at = SystemTime::now();
        }
    }

    /// Ends a PENDING job: SUCCESS when `error` is `None`, else FAILURE with it. Whether it
    /// was pending (a job ends once).
    pub fn finish(&self, id: u64, error: Option<String>, blobs: Vec<BlobOutcome>) -> bool {
        let mut table = self.table.lock();
        let Some(job) = table.jobs.get_mut(&id) else {
            return false;
        };
        if job.state != State::Pending {
            return false;
        }
        job.state = match error {
            None => State::Success,
            Some(_) => State::Failure,
        };
        job.progress.phase = match error {
            None => "done".into(),
            Some(_) => "failed".into(),
        };
        job.error = error;
        job.blobs = blobs;
        job.updated_at = SystemTime::now();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_ends_once() {
        let jobs = Jobs::default();
        let job = jobs.create("r/a:1".into()).unwrap();
        assert_eq!(job.state, State::Pending);
        jobs.progress(job.id, |p| p.blobs_done = 1);
        assert_eq!(jobs.get(job.id).unwrap().progress.blobs_done, 1);
        assert!(jobs.finish(job.id, Some("manifest unknown".into()), Vec::new()));
        // Neither a second end nor late progress changes it.
        assert!(!jobs.finish(job.id, None, Vec::new()));
        jobs.progress(job.id, |p| p.blobs_done = 2);
        let ended = jobs.get(job.id).unwrap();
        assert_eq!(ended.state, State::Failure);
        assert_eq!(ended.error.as_deref(), Some("manifest unknown"));
        assert_eq!(ended.progress.blobs_done, 1);
        assert!(!jobs.finish(999, None, Vec::new()));
    }

    #[test]
    fn ids_grow_and_the_table_is_bounded() {
        let jobs = Jobs::default();
        let mut last = 0;
        for _ in 0..MAX_JOBS + 10 {
            let job = jobs.create("r/a:1".into()).unwrap();
            assert!(job.id > last);
            last = job.id;
            assert!(jobs.finish(job.id, None, Vec::new()));
        }
        assert_eq!(jobs.table.lock().jobs.len(), MAX_JOBS);
        assert!(
            jobs.get(1).is_none(),
            "the oldest finished job is forgotten"
        );
        assert!(jobs.get(last).is_some());
    }

    #[test]
    fn running_jobs_are_bounded_and_never_forgotten() {
        let jobs = Jobs::default();
        let ids: Vec<u64> = (0..MAX_PENDING)
            .map(|_| jobs.create("r/a:1".into()).unwrap().id)
            .collect();
        assert_eq!(jobs.create("r/a:1".into()).unwrap_err(), TooMany);
        assert!(jobs.finish(ids[0], None, Vec::new()));
        let next = jobs.create("r/a:1".into()).unwrap();
        assert!(ids.iter().all(|&id| jobs.get(id).is_some()));
        assert_eq!(jobs.get(next.id).unwrap().state, State::Pending);
    }
}
