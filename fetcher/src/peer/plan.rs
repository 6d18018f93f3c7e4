//! [`PeerFetchPlan`]: the decisions of one round of asking peers for blocks, without I/O or
//! a clock of its own. Given the index owner's advice, this node's view of the members and
//! what it already tried, it says which blocks go to which holder, which to the registry, and
//! how long to wait; the daemon's [`Peers::fetch`](super::Peers::fetch) and the simulator
//! ([`super::sim`]) both drive it, so that what the simulation measures is what nodes decide.
//!
//! Also here: [`Renewals`], when a node fetching granted blocks renews its grant and when it
//! stops.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::hedge::{runs_by_holder, HolderRun};
use super::member::{Membership, PeerAddr};
use super::wire::Advice;

/// How soon blocks whose holders are all busy are asked about again.
pub const BUSY_RETRY: Duration = Duration::from_millis(50);
/// How long, in budgets, a block whose holders are all busy is waited for while no new
/// holder of it appears. A busy holder is alive and sending the block to others, who then
/// hold it too; only a holder that stays busy this long without the block spreading is
/// stuck, and the registry is a second fetch of the block for the cluster. The fetch's
/// deadline bounds the wait whatever happens.
pub const BUSY_BUDGETS: u32 = 5;

/// One fetch's state across its rounds of lookups: blocks still pending, holders tried for
/// each, blocks whose holders were all busy (and since when), and blocks for the registry.
pub struct PeerFetchPlan {
    budget: Duration,
    pending: BTreeSet<u64>,
    tried: HashMap<u64, HashSet<PeerAddr>>,
    /// Holders the owner named for each block so far.
    named: HashMap<u64, HashSet<PeerAddr>>,
    busy_since: HashMap<u64, Instant>,
    waited: bool,
    fetch: Vec<u64>,
}

/// What to do with one round's advice: requests to holders (adjacent blocks of one holder
/// together), a pause when nothing could be asked, and how many blocks fell back to the
/// registry after waiting on peers (a counter).
#[derive(Debug, Default)]
pub struct PeerStep {
    pub runs: Vec<HolderRun>,
    pub wait: Option<Duration>,
    pub fallbacks: u64,
    /// Of those, blocks whose holders were all busy for a budget.
    pub busy_expired: u64,
    /// When the advice was taken, which busy answers to its requests are dated from.
    at: Option<Instant>,
}

/// How one request to holders went, as the plan needs to know it.
#[derive(Debug, Default, Clone)]
pub struct RunAnswer {
    /// The holder that sent the blocks, if one did.
    pub got: Option<PeerAddr>,
    /// Holders that failed (not to be asked for these blocks again in this fetch).
    pub failed: Vec<PeerAddr>,
    /// Whether some holder said it was busy.
    pub busy: bool,
}

/// What follows a round once its requests are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRound {
    /// Some blocks must come from the registry now: the round ends so they are fetched first.
    Registry,
    /// Ask the owner again now.
    Ask,
    /// Ask the owner again after this pause.
    Pause(Duration),
    /// Nothing more to ask peers: the rest goes to the registry.
    Stop,
}

impl PeerFetchPlan {
    /// A plan for `blocks`, where a block whose holders are all busy waits `budget` at most.
    pub fn new(blocks: &[u64], budget: Duration) -> PeerFetchPlan {
        PeerFetchPlan {
            budget,
            pending: blocks.iter().copied().collect(),
            tried: HashMap::new(),
            named: HashMap::new(),
            busy_since: HashMap::new(),
            waited: false,
            fetch: Vec::new(),
        }
    }

    /// The blocks to ask the owner about next (first to last pending), if any are pending.
    pub fn asking(&self) -> Option<Range<u64>> {
        let (&first, &last) = (self.pending.first()?, self.pending.last()?);
        Some(first..last + 1)
    }

    /// Takes the owner's `advice` for blocks from `first` on, seen by a node whose own address
    /// is `me` and whose view of the members is `members`, at `now`.
    pub fn advise(
        &mut self,
        now: Instant,
        first: u64,
        advice: &[Advice],
        me: Option<PeerAddr>,
        members: &Membership,
    ) -> PeerStep {
        let mut step = PeerStep {
            at: Some(now),
            ..PeerStep::default()
        };
        let mut plan: Vec<(u64, Vec<PeerAddr>)> = Vec::new();
        for (index, advice) in (first..).zip(advice) {
            if !self.pending.contains(&index) {
                continue;
            }
            match advice {
                Advice::Fetch => {
                    self.pending.remove(&index);
                    self.fetch.push(index);
                    // The owner may send a node to the registry because the holders it
                    // knew turned out busy or failing: that block waited on peers too.
                    if self.tried.contains_key(&index) || self.busy_since.contains_key(&index) {
                        step.fallbacks += 1;
                    }
                }
                Advice::Wait { retry_ms, .. } => {
                    step.wait = Some(Duration::from_millis((*retry_ms).clamp(5, 500)));
                }
                Advice::Holders { holders } => {
                    let tried = self.tried.entry(index).or_default();
                    let holders: Vec<PeerAddr> =
                        holders.iter().filter_map(|h| h.parse().ok()).collect();
                    // A block that gained a holder is spreading: its busy holders are a herd
                    // being served, not one stuck holder, and the registry would be a second
                    // fetch of it. The budget of waiting on busy holders starts again.
                    let named = self.named.entry(index).or_default();
                    let mut spreading = false;
                    for holder in &holders {
                        spreading |= named.insert(*holder);
                    }
                    if let (true, Some(since)) = (spreading, self.busy_since.get_mut(&index)) {
                        *since = now;
                    }
                    let usable: Vec<PeerAddr> = holders
                        .iter()
                        .copied()
                        .filter(|h| {
                            Some(*h) != me && !tried.contains(h) && !members.is_avoided(h, now)
                        })
                        .collect();
                    let some_busy = || {
                        holders
                            .iter()
                            .any(|h| !tried.contains(h) && members.is_busy(h, now))
                    };
                    if !usable.is_empty() {
                        plan.push((index, usable));
                    } else if some_busy()
                        && now
                            < *self.busy_since.entry(index).or_insert(now)
                                + self.budget * BUSY_BUDGETS
                    {
                        // Busy holders will answer shortly; the registry would be a second
                        // fetch of the block for the cluster.
                        step.wait = Some(BUSY_RETRY);
                    } else {
                        // Every holder was tried or is avoided: the registry.
                        self.pending.remove(&index);
                        self.fetch.push(index);
                        step.fallbacks += 1;
                        step.busy_expired += u64::from(self.busy_since.contains_key(&index));
                    }
                }
            }
        }
        step.runs = runs_by_holder(&plan);
        step
    }

    /// Records how the request for `run` (from `step`) went; blocks it got are no longer
    /// pending.
    pub fn answered(&mut self, step: &PeerStep, run: &HolderRun, answer: &RunAnswer) {
        if answer.busy {
            let at = step.at.unwrap_or_else(Instant::now);
            for index in run.blocks.clone() {
                self.busy_since.entry(index).or_insert(at);
            }
        }
        for holder in &answer.failed {
            for index in run.blocks.clone() {
                self.tried.entry(index).or_default().insert(*holder);
            }
        }
        if answer.got.is_some() {
            for index in run.blocks.clone() {
                self.pending.remove(&index);
            }
        }
    }

    /// What follows `step` once every request in it was answered.
    pub fn after(&mut self, step: &PeerStep) -> AfterRound {
        if !self.fetch.is_empty() {
            AfterRound::Registry
        } else if !step.runs.is_empty() {
            AfterRound::Ask
        } else if let Some(pause) = step.wait {
            self.waited = true;
            AfterRound::Pause(pause)
        } else {
            AfterRound::Stop
        }
    }

    /// Ends the fetch after [`AfterRound::Registry`]: the blocks for the registry (ascending)
    /// and those still worth waiting for.
    pub fn registry_first(mut self) -> (Vec<u64>, Vec<u64>) {
        self.fetch.sort_unstable();
        (self.fetch, self.pending.into_iter().collect())
    }

    /// Ends the fetch otherwise (out of time, no owner answered, nothing to ask): every block
    /// not got goes to the registry. Also how many of them waited on peers first (a counter).
    pub fn give_up(mut self) -> (Vec<u64>, u64) {
        let fallbacks = if self.waited || !self.tried.is_empty() || !self.busy_since.is_empty() {
            self.pending.len() as u64
        } else {
            0
        };
        self.fetch.extend(self.pending);
        self.fetch.sort_unstable();
        (self.fetch, fallbacks)
    }
}

/// When a node fetching blocks it was granted renews the grant at their owner: every third
/// of the grant (one renewal may be lost or late without the grant lapsing), and never again
/// once no owner took one for a whole grant, which has lapsed then.
pub struct Renewals {
    grant: Duration,
    taken: Instant,
}

impl Renewals {
    pub fn new(grant: Duration, now: Instant) -> Renewals {
        Renewals { grant, taken: now }
    }

    /// The pause between renewals.
    pub fn every(&self) -> Duration {
        (self.grant / 3).max(Duration::from_millis(20))
    }

    /// How long a renewal sent at `now` may take, or `None` when renewals are over.
    pub fn left(&self, now: Instant) -> Option<Duration> {
        Some(
            self.grant
                .saturating_sub(now.saturating_duration_since(self.taken)),
        )
        .filter(|left| !left.is_zero())
    }

    /// An owner took a renewal at `now`.
    pub fn taken(&mut self, now: Instant) {
        self.taken = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> PeerAddr {
        PeerAddr(format!("10.0.0.{i}:7420").parse().unwrap())
    }

    fn members() -> Membership {
        let members = Membership::default();
        members.set_known((1..=4).map(addr).collect());
        for i in 1..=4 {
            members.probed(addr(i), true, i == 1);
        }
        members
    }

    fn holders(of: &[u8]) -> Advice {
        Advice::Holders {
            holders: of.iter().map(|&i| addr(i).to_string()).collect(),
        }
    }

    const BUDGET: Duration = Duration::from_secs(2);

    #[test]
    fn fetch_advice_ends_the_round_with_the_rest_still_waited_for() {
        let members = members();
        let now = Instant::now();
        let mut plan = PeerFetchPlan::new(&[3, 4, 5], BUDGET);
        assert_eq!(plan.asking(), Some(3..6));
        let wait = Advice::Wait {
            holder: addr(2).to_string(),
            retry_ms: 20,
        };
        let step = plan.advise(
            now,
            3,
            &[Advice::Fetch, wait, holders(&[1, 3])],
            Some(addr(1)),
            &members,
        );
        // This node is never asked for blocks, even when the owner names it.
        assert_eq!(step.runs.len(), 1);
        assert_eq!(
            (step.runs[0].holder, step.runs[0].blocks.clone()),
            (addr(3), 5..6)
        );
        let answer = RunAnswer {
            got: Some(addr(3)),
            ..RunAnswer::default()
        };
        plan.answered(&step, &step.runs[0].clone(), &answer);
        assert_eq!(plan.after(&step), AfterRound::Registry);
        assert_eq!(plan.registry_first(), (vec![3], vec![4]));
    }

    #[test]
    fn failed_holders_are_not_asked_again_and_then_the_registry_is() {
        let members = members();
        let now = Instant::now();
        let mut plan = PeerFetchPlan::new(&[0], BUDGET);
        let step = plan.advise(now, 0, &[holders(&[2, 3])], Some(addr(1)), &members);
        assert_eq!(step.runs[0].alternates, [addr(3)]);
        let answer = RunAnswer {
            failed: vec![addr(2), addr(3)],
            ..RunAnswer::default()
        };
        plan.answered(&step, &step.runs[0].clone(), &answer);
        assert_eq!(plan.after(&step), AfterRound::Ask);
        let step = plan.advise(now, 0, &[holders(&[2, 3])], Some(addr(1)), &members);
        assert!(step.runs.is_empty() && step.fallbacks == 1);
        assert_eq!(plan.after(&step), AfterRound::Registry);
    }

    /// How long busy holders are waited for without the block spreading.
    const BUSY_WAIT: Duration = Duration::from_secs(2 * BUSY_BUDGETS as u64);

    #[test]
    fn busy_holders_are_waited_for_a_few_budgets_at_most() {
        use super::super::member::Penalty;
        let members = members();
        let t0 = Instant::now();
        members.penalise(addr(2), Penalty::Busy, t0);
        let mut plan = PeerFetchPlan::new(&[0], BUDGET);
        let step = plan.advise(t0, 0, &[holders(&[2])], Some(addr(1)), &members);
        assert_eq!(step.wait, Some(BUSY_RETRY));
        assert_eq!(plan.after(&step), AfterRound::Pause(BUSY_RETRY));
        // Still busy a budget later: a herd being served, waited for still.
        let t1 = t0 + BUDGET;
        members.penalise(addr(2), Penalty::Busy, t1);
        let step = plan.advise(t1, 0, &[holders(&[2])], Some(addr(1)), &members);
        assert_eq!((step.wait, step.fallbacks), (Some(BUSY_RETRY), 0));
        plan.after(&step);
        // Still busy and the block not spreading for the whole wait: the registry.
        let t2 = t0 + BUSY_WAIT;
        members.penalise(addr(2), Penalty::Busy, t2);
        let step = plan.advise(t2, 0, &[holders(&[2])], Some(addr(1)), &members);
        assert_eq!((step.wait, step.fallbacks), (None, 1));
        assert_eq!(plan.after(&step), AfterRound::Registry);
    }

    #[test]
    fn a_block_whose_holders_are_busy_waits_then_goes_to_another_holder() {
        use super::super::member::Penalty;
        let members = members();
        let t0 = Instant::now();
        let mut plan = PeerFetchPlan::new(&[0, 1], BUDGET);
        members.penalise(addr(2), Penalty::Busy, t0);
        let step = plan.advise(
            t0,
            0,
            &[holders(&[2]), holders(&[2])],
            Some(addr(1)),
            &members,
        );
        assert!(step.runs.is_empty());
        assert_eq!(plan.after(&step), AfterRound::Pause(BUSY_RETRY));
        // Past one budget (where the registry used to take over) the owner names a free
        // holder: it is asked, and nothing goes to the registry.
        let t1 = t0 + BUDGET + Duration::from_millis(100);
        members.penalise(addr(2), Penalty::Busy, t1);
        let step = plan.advise(
            t1,
            0,
            &[holders(&[2, 3]), holders(&[2, 3])],
            Some(addr(1)),
            &members,
        );
        assert_eq!(step.fallbacks, 0);
        assert_eq!(
            (step.runs[0].holder, step.runs[0].blocks.clone()),
            (addr(3), 0..2)
        );
        let answer = RunAnswer {
            got: Some(addr(3)),
            ..RunAnswer::default()
        };
        plan.answered(&step, &step.runs[0].clone(), &answer);
        assert_eq!(plan.after(&step), AfterRound::Ask);
        assert_eq!(plan.asking(), None);
        assert_eq!(plan.give_up(), (vec![], 0));
    }

    #[test]
    fn a_block_gaining_holders_waits_on_busy_holders_past_the_busy_wait() {
        use super::super::member::Penalty;
        let members = members();
        let t0 = Instant::now();
        let mut plan = PeerFetchPlan::new(&[0], BUDGET);
        members.penalise(addr(2), Penalty::Busy, t0);
        let step = plan.advise(t0, 0, &[holders(&[2])], Some(addr(1)), &members);
        assert_eq!(step.wait, Some(BUSY_RETRY));
        plan.after(&step);
        // Nearly a busy wait later a second holder appears, busy as well: the wait goes on.
        let t1 = t0 + BUSY_WAIT - Duration::from_millis(10);
        members.penalise(addr(2), Penalty::Busy, t1);
        members.penalise(addr(3), Penalty::Busy, t1);
        let step = plan.advise(t1, 0, &[holders(&[2, 3])], Some(addr(1)), &members);
        assert_eq!(step.wait, Some(BUSY_RETRY));
        plan.after(&step);
        // Past a busy wait since the first busy answer, not since the last new holder.
        let t2 = t0 + BUSY_WAIT + Duration::from_millis(500);
        members.penalise(addr(2), Penalty::Busy, t2);
        members.penalise(addr(3), Penalty::Busy, t2);
        let step = plan.advise(t2, 0, &[holders(&[2, 3])], Some(addr(1)), &members);
        assert_eq!((step.wait, step.fallbacks), (Some(BUSY_RETRY), 0));
        plan.after(&step);
        // No new holder for a whole busy wait: stuck, so the registry.
        let t3 = t1 + BUSY_WAIT;
        members.penalise(addr(2), Penalty::Busy, t3);
        members.penalise(addr(3), Penalty::Busy, t3);
        let step = plan.advise(t3, 0, &[holders(&[3, 2])], Some(addr(1)), &members);
        assert_eq!((step.wait, step.fallbacks), (None, 1));
        assert_eq!(plan.after(&step), AfterRound::Registry);
    }

    #[test]
    fn a_plan_given_up_sends_the_rest_to_the_registry_and_counts_waited_blocks() {
        let members = members();
        let now = Instant::now();
        let plan = PeerFetchPlan::new(&[1, 2], BUDGET);
        assert_eq!(plan.give_up(), (vec![1, 2], 0));
        let mut plan = PeerFetchPlan::new(&[1, 2], BUDGET);
        let wait = Advice::Wait {
            holder: addr(2).to_string(),
            retry_ms: 1,
        };
        let step = plan.advise(now, 1, &[wait.clone(), wait], Some(addr(1)), &members);
        assert_eq!(
            plan.after(&step),
            AfterRound::Pause(Duration::from_millis(5))
        );
        assert_eq!(plan.give_up(), (vec![1, 2], 2));
    }

    #[test]
    fn renewals_come_every_third_of_the_grant_and_stop_a_grant_after_the_last_taken() {
        let t0 = Instant::now();
        let mut renewals = Renewals::new(BUDGET, t0);
        assert_eq!(renewals.every(), BUDGET / 3);
        assert_eq!(renewals.left(t0 + BUDGET / 3), Some(BUDGET - BUDGET / 3));
        renewals.taken(t0 + BUDGET);
        assert!(renewals.left(t0 + BUDGET * 3 / 2).is_some());
        assert_eq!(renewals.left(t0 + BUDGET * 2), None);
    }
}
