//! Asking holders for blocks: adjacent blocks of one holder go in one range request
//! ([`HolderRun`]), and a request that runs late at the [`Pace`](super::pace::Pace) peers
//! have shown is sent to a second holder too, the first good answer winning.

use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use super::client::PeerFailure;
use super::member::{PeerAddr, Penalty};
use super::stats::{Outcome, PeerCounters};
use super::Peers;
use crate::reference::BlobRef;

impl Peers {
    /// Blocks `run.blocks` of `blob` from the run's first holder; if it has not answered
    /// when a transfer at the pace peers have shown should be over, from a second holder too,
    /// the first good answer winning (the other request is dropped).
    pub(super) async fn get_hedged(
        &self,
        blob: &BlobRef,
        run: &HolderRun,
        deadline: Instant,
    ) -> Hedged {
        let mut hedged = Hedged::default();
        let budget = self.config.latency_budget;
        let until = deadline.min(Instant::now() + budget);
        let bytes = self.block_bytes(blob, run.blocks.end - 1).end
            - self.block_bytes(blob, run.blocks.start).start;
        let primary = run.holder;
        let first = self.get(primary, blob, run.blocks.clone(), until);
        tokio::pin!(first);
        let Some(&second) = run.alternates.first() else {
            hedged.note(primary, first.await);
            return hedged;
        };
        let hedge_at = Instant::now() + self.pace.hedge_after(bytes, budget);
        let first_answered = tokio::select! {
            got = &mut first => {
                if hedged.note(primary, got) {
                    return hedged;
                }
                true
            }
            () = tokio::time::sleep_until(hedge_at.min(until).into()) => {
                PeerCounters::add(&self.counters.hedges, 1);
                false
            }
        };
        let other = self.get(second, blob, run.blocks.clone(), until);
        if first_answered {
            // The first holder refused before the hedge was due: the second is a retry.
            hedged.note(second, other.await);
            return hedged;
        }
        tokio::pin!(other);
        tokio::select! {
            got = &mut first => {
                if !hedged.note(primary, got) {
                    hedged.note(second, other.await);
                }
            }
            got = &mut other => {
                if !hedged.note(second, got) {
                    hedged.note(primary, first.await);
                }
            }
        }
        hedged
    }

    /// Blocks `run` of `blob` from `holder`, counted and penalised as they go.
    async fn get(
        &self,
        holder: PeerAddr,
        blob: &BlobRef,
        run: Range<u64>,
        deadline: Instant,
    ) -> Result<Bytes, PeerFailure> {
        let range =
            self.block_bytes(blob, run.start).start..self.block_bytes(blob, run.end - 1).end;
        let started = Instant::now();
        // A proof of pull access crosses only mutual TLS, to a holder of the blob.
        let proof = self
            .config
            .tls
            .as_ref()
            .and_then(|_| self.gate.proof(&blob.image));
        match self
            .client
            .blocks(holder, &blob.digest, range, proof, deadline)
            .await
        {
            Ok(bytes) => {
                let took = started.elapsed();
                self.pace.observe(bytes.len() as u64, took);
                self.counters.record(
                    holder,
                    Outcome::Served {
                        bytes: bytes.len() as u64,
                        took,
                    },
                );
                Ok(bytes)
            }
            Err(failure) => {
                debug!(%holder, %failure, "block request to peer failed");
                let outcome = match &failure {
                    PeerFailure::Busy => Outcome::Busy,
                    _ => Outcome::Failed,
                };
                self.counters.record(holder, outcome);
                if let Some(penalty) = penalty_for(&failure) {
                    self.members.penalise(holder, penalty, Instant::now());
                }
                Err(failure)
            }
        }
    }
}

/// How a holder that failed a block request is avoided: busy for a moment, unreachable for
/// longer; a holder that withholds private blocks, or no longer holds them, is right to.
pub(super) fn penalty_for(failure: &PeerFailure) -> Option<Penalty> {
    match failure {
        PeerFailure::Busy => Some(Penalty::Busy),
        PeerFailure::Missing | PeerFailure::Refused(_) => None,
        PeerFailure::Failed(_) => Some(Penalty::Unreachable),
    }
}

/// Adjacent blocks asked of one holder with one range request, and other holders of all of
/// them to hedge with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HolderRun {
    pub holder: PeerAddr,
    pub blocks: Range<u64>,
    pub alternates: Vec<PeerAddr>,
}

/// How a hedged request went: the bytes and who sent them, holders that failed (how many
/// of those said they do not hold the blocks at all), and holders that were busy.
#[derive(Default)]
pub(super) struct Hedged {
    pub got: Option<(PeerAddr, Bytes)>,
    pub failed: Vec<PeerAddr>,
    pub missing: usize,
    pub busy: Vec<PeerAddr>,
}

impl Hedged {
    /// Records `holder`'s answer; true when it sent the bytes.
    pub(super) fn note(&mut self, holder: PeerAddr, answer: Result<Bytes, PeerFailure>) -> bool {
        match answer {
            Ok(bytes) => {
                self.got = Some((holder, bytes));
                true
            }
            // Busy is for now, not for good: the holder may be asked again shortly.
            Err(PeerFailure::Busy) => {
                self.busy.push(holder);
                false
            }
            Err(failure) => {
                self.missing += usize::from(matches!(failure, PeerFailure::Missing));
                self.failed.push(holder);
                false
            }
        }
    }
}

/// Groups blocks (in block order) with their usable holders (best first) into runs of
/// adjacent blocks with the same first holder, each fetched with one range request; a run's
/// alternates are the other holders of every one of its blocks.
pub(super) fn runs_by_holder(plan: &[(u64, Vec<PeerAddr>)]) -> Vec<HolderRun> {
    let mut runs: Vec<HolderRun> = Vec::new();
    for (index, holders) in plan {
        let Some((&holder, others)) = holders.split_first() else {
            continue;
        };
        match runs.last_mut() {
            Some(run) if run.holder == holder && run.blocks.end == *index => {
                run.blocks.end += 1;
                run.alternates
                    .retain(|alternate| others.contains(alternate));
            }
            _ => runs.push(HolderRun {
                holder,
                blocks: *index..index + 1,
                alternates: others.to_vec(),
            }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_blocks_of_one_holder_go_together_with_the_holders_they_share() {
        let a: PeerAddr = "10.0.0.1:7420".parse().unwrap();
        let b: PeerAddr = "10.0.0.2:7420".parse().unwrap();
        let c: PeerAddr = "10.0.0.3:7420".parse().unwrap();
        let runs = runs_by_holder(&[
            (0, vec![a, b, c]),
            (1, vec![a, c]),
            (2, vec![b]),
            (4, vec![b, a]),
            (5, vec![a]),
        ]);
        let run = |holder, blocks, alternates: &[PeerAddr]| HolderRun {
            holder,
            blocks,
            alternates: alternates.to_vec(),
        };
        assert_eq!(
            runs,
            [
                run(a, 0..2, &[c]),
                run(b, 2..3, &[]),
                run(b, 4..5, &[a]),
                run(a, 5..6, &[]),
            ]
        );
    }
}
