//! Bytes moving in the simulated cluster: a read's requests to holders (hedged as
//! [`Peers::get_hedged`](super::super::Peers) hedges them, at the node's real [`Pace`]),
//! the holder's side (its upload slots and uplink), registry fetches with grant renewals,
//! and announcements reaching owners.
//!
//! [`Pace`]: super::super::pace::Pace

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

use super::super::client::PeerFailure;
use super::super::hedge::{penalty_for, Hedged, HolderRun};
use super::super::member::Penalty;
use super::super::plan::{Renewals, RunAnswer};
use super::cluster::{Cluster, Event};

/// A holder's answer to a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Sent,
    Busy,
    /// The requester's deadline passed first.
    TimedOut,
}

/// Where a hedged request is: as in `get_hedged`, the first holder alone until the hedge
/// is due (or it failed: then the second is a retry), then both, the first good answer
/// winning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Only the first holder was asked and there is no other.
    Single,
    /// The first holder was asked; the hedge is not due yet.
    Racing,
    /// The first failed; the second was asked instead.
    Retry,
    /// Both were asked.
    Both,
    /// Both were asked and one failed: the other's answer ends it.
    Other,
    Done,
}

pub(super) struct Race {
    pub run: HolderRun,
    bytes: u64,
    until: Duration,
    phase: Phase,
    hedged: Hedged,
}

impl Race {
    /// The answer as `Peers::fetch` hands it to the plan.
    pub fn answer(&self) -> RunAnswer {
        RunAnswer {
            got: self.hedged.got.as_ref().map(|(holder, _)| *holder),
            failed: self.hedged.failed.clone(),
            busy: !self.hedged.busy.is_empty(),
        }
    }
}

/// A read's registry fetch: stretches of adjacent blocks one after another, the grant on
/// all of them renewed until the last lands.
pub(super) struct RegistryJob {
    stretches: Vec<Range<u64>>,
    next: usize,
    span: Range<u64>,
    renewals: Renewals,
}

impl Cluster {
    pub fn handle_transfer(&mut self, event: Event) {
        match event {
            Event::AtHolder {
                read,
                gen,
                race,
                which,
                holder,
                sent,
            } => self.at_holder(read, gen, race, which, holder, sent),
            Event::Reply {
                read,
                gen,
                race,
                which,
                answer,
                sent,
            } => {
                if self.reads[read].gen == gen {
                    self.replied(read, race, which, answer, sent);
                }
            }
            Event::HedgeDue { read, gen, race } => {
                let r = &self.reads[read];
                if r.gen == gen && r.races[race].phase == Phase::Racing {
                    self.metrics.hedges += 1;
                    self.reads[read].races[race].phase = Phase::Both;
                    self.ask_holder(read, race, 1);
                }
            }
            Event::UploadDone(holder) => self.nodes[holder].uploads -= 1,
            Event::Landed { read, gen } => {
                if self.reads[read].gen == gen {
                    self.landed(read);
                }
            }
            Event::RenewDue { read, gen } => self.renew_due(read, gen),
            Event::RenewAtOwner {
                read,
                gen,
                owner,
                sent,
                left,
            } => {
                let r = &self.reads[read];
                let (n, layer) = (r.node, r.layer);
                if let Some(job) = &r.job {
                    let span = job.span.clone();
                    let now = self.queue.instant(self.queue.now());
                    self.metrics.owner_request(owner, self.queue.now());
                    self.nodes[owner].index.renew(
                        now,
                        self.nodes[n].addr,
                        &self.blobs[layer],
                        span.start,
                        span.end - span.start,
                    );
                }
                let at = self.queue.now() + self.latency(owner, n);
                self.queue.at(
                    at,
                    Event::RenewReply {
                        read,
                        gen,
                        sent,
                        left,
                    },
                );
            }
            Event::RenewReply {
                read,
                gen,
                sent,
                left,
            } => {
                let now = self.queue.now();
                let r = &mut self.reads[read];
                if let (true, Some(job)) = (r.gen == gen, r.job.as_mut()) {
                    if now - sent <= left {
                        job.renewals.taken(self.queue.instant(now));
                    }
                    let every = job.renewals.every();
                    self.queue.at(now + every, Event::RenewDue { read, gen });
                }
            }
            Event::AnnounceAtOwner {
                owner,
                from,
                layer,
                blocks,
            } => {
                let now = self.queue.instant(self.queue.now());
                self.metrics.owner_request(owner, self.queue.now());
                let addr = self.nodes[from].addr;
                self.nodes[owner]
                    .index
                    .announce(now, addr, &self.blobs[layer], &blocks, false);
            }
            _ => unreachable!("handled by the cluster"),
        }
    }

    /// Sends the request for `run`, hedged.
    pub fn start_race(&mut self, read: usize, run: HolderRun) {
        let now = self.queue.now();
        let r = &mut self.reads[read];
        let bytes = (run.blocks.end - run.blocks.start) * self.config.block_size;
        let budget = self.config.latency_budget;
        let until = r.deadline.min(now + budget);
        let single = run.alternates.is_empty();
        let race = r.races.len();
        let gen = r.gen;
        r.races.push(Race {
            run,
            bytes,
            until,
            phase: if single { Phase::Single } else { Phase::Racing },
            hedged: Hedged::default(),
        });
        let hedge_after = self.nodes[r.node].pace.hedge_after(bytes, budget);
        self.ask_holder(read, race, 0);
        if !single {
            self.queue.at(
                (now + hedge_after).min(until),
                Event::HedgeDue { read, gen, race },
            );
        }
    }

    /// Asks the run's first holder (`which` 0) or its first alternate (1).
    fn ask_holder(&mut self, read: usize, race: usize, which: usize) {
        let r = &self.reads[read];
        let run = &r.races[race].run;
        let addr = if which == 0 {
            run.holder
        } else {
            run.alternates[0]
        };
        let holder = self.by_addr[&addr];
        let now = self.queue.now();
        let event = Event::AtHolder {
            read,
            gen: r.gen,
            race,
            which,
            holder,
            sent: now,
        };
        self.queue.at(now + self.latency(r.node, holder), event);
    }

    /// The holder takes the request: busy when its upload slots are taken, else the bytes
    /// go through its uplink and the requester's downlink.
    fn at_holder(
        &mut self,
        read: usize,
        gen: u64,
        race: usize,
        which: usize,
        holder: usize,
        sent: Duration,
    ) {
        let now = self.queue.now();
        let r = &self.reads[read];
        let n = r.node;
        let latency = self.latency(holder, n);
        let Some(state) = r.races.get(race).filter(|_| r.gen == gen) else {
            return;
        };
        let (bytes, until) = (state.bytes, state.until);
        let (answer, at) = if self.nodes[holder].uploads >= self.config.max_uploads {
            self.metrics.busy += 1;
            (Answer::Busy, now + latency)
        } else {
            self.nodes[holder].uploads += 1;
            let sent_up = self.nodes[holder].up.send(now, bytes) + latency;
            let arrived = self.nodes[n].down.send(now + latency, bytes).max(sent_up);
            self.metrics.peer_sent(holder, n, bytes);
            self.queue
                .at(arrived.min(until + latency), Event::UploadDone(holder));
            if arrived > until {
                self.metrics.timeouts += 1;
                (Answer::TimedOut, until)
            } else {
                (Answer::Sent, arrived)
            }
        };
        let event = Event::Reply {
            read,
            gen,
            race,
            which,
            answer,
            sent,
        };
        self.queue.at(at.min(until), event);
    }

    /// A holder answered: noted and penalised as `get` does, then the race goes on.
    fn replied(&mut self, read: usize, race: usize, which: usize, answer: Answer, sent: Duration) {
        let now = self.queue.now();
        let instant = self.queue.instant(now);
        let r = &mut self.reads[read];
        let n = r.node;
        let state = &mut r.races[race];
        if state.phase == Phase::Done {
            self.metrics.hedge_losers += 1;
            return;
        }
        let holder = if which == 0 {
            state.run.holder
        } else {
            state.run.alternates[0]
        };
        let result = match answer {
            Answer::Sent => {
                self.nodes[n].pace.observe(state.bytes, now - sent);
                Ok(Bytes::new())
            }
            Answer::Busy => Err(PeerFailure::Busy),
            Answer::TimedOut => Err(PeerFailure::Failed("timed out".into())),
        };
        let mut unreachable = false;
        if let Err(failure) = &result {
            if let Some(penalty) = penalty_for(failure) {
                self.nodes[n].members.penalise(holder, penalty, instant);
                unreachable = penalty == Penalty::Unreachable;
            }
        }
        let got = state.hedged.note(holder, result);
        let (phase, retry) = match (state.phase, got) {
            (_, true) | (Phase::Single | Phase::Retry | Phase::Other, false) => {
                (Phase::Done, false)
            }
            (Phase::Racing, false) => (Phase::Retry, true),
            (Phase::Both, false) => (Phase::Other, false),
            (Phase::Done, _) => (Phase::Done, false),
        };
        state.phase = phase;
        let blocks = state.run.blocks.clone();
        let layer = r.layer;
        if unreachable {
            let member = self.by_addr[&holder];
            self.unreachable(n, member);
        }
        if got {
            self.metrics
                .peer_got(n, (blocks.end - blocks.start) * self.config.block_size);
            self.got(n, layer, blocks);
        }
        if retry {
            self.ask_holder(read, race, 1);
        }
        if phase == Phase::Done {
            let r = &mut self.reads[read];
            r.open -= 1;
            if r.open == 0 {
                self.after_round(read);
            }
        }
    }

    /// `fetch_gaps`: the blocks from the registry, one stretch of adjacent blocks after
    /// another, renewing the grant on all of them meanwhile; then the read's next round.
    pub fn fetch_registry(&mut self, read: usize, blocks: Vec<u64>) {
        let r = &mut self.reads[read];
        r.gen += 1;
        // Every round ends here: how long the read asked peers is bounded.
        self.metrics.peer_phase(self.queue.now() - r.started);
        let (Some(&first), Some(&last)) = (blocks.first(), blocks.last()) else {
            r.job = None;
            return self.begin_round(read);
        };
        let mut stretches: Vec<Range<u64>> = Vec::new();
        for index in blocks {
            match stretches.last_mut() {
                Some(stretch) if stretch.end == index => stretch.end += 1,
                _ => stretches.push(index..index + 1),
            }
        }
        let now = self.queue.now();
        let renewals = Renewals::new(self.config.latency_budget, self.queue.instant(now));
        let gen = r.gen;
        self.queue
            .at(now + renewals.every(), Event::RenewDue { read, gen });
        r.job = Some(RegistryJob {
            stretches,
            next: 0,
            span: first..last + 1,
            renewals,
        });
        self.next_stretch(read);
    }

    fn next_stretch(&mut self, read: usize) {
        let now = self.queue.now();
        let r = &mut self.reads[read];
        let Some(job) = r.job.as_mut() else {
            return;
        };
        let Some(stretch) = job.stretches.get(job.next).cloned() else {
            r.job = None;
            r.gen += 1;
            return self.begin_round(read);
        };
        let (n, layer, gen) = (r.node, r.layer, r.gen);
        let bytes = (stretch.end - stretch.start) * self.config.block_size;
        let at = self.queue.instant(now);
        let owners = self.owners(n, layer);
        let (nodes, blob) = (&self.nodes, &self.blobs[layer]);
        let granted = |index: u64, other: usize| {
            owners.iter().any(|&owner| {
                nodes[owner].index.grantee(at, blob, index) == Some(nodes[other].addr)
            })
        };
        self.metrics
            .registry_started(n, layer, stretch.clone(), bytes, granted);
        let latency = self.config.registry_latency;
        let sent = self.registry.send(now + latency, bytes) + latency;
        let arrived = self.nodes[n].down.send(now + 2 * latency, bytes).max(sent);
        self.queue.at(arrived, Event::Landed { read, gen });
    }

    fn landed(&mut self, read: usize) {
        let r = &mut self.reads[read];
        let Some(job) = r.job.as_mut() else {
            return;
        };
        let stretch = job.stretches[job.next].clone();
        job.next += 1;
        let (n, layer) = (r.node, r.layer);
        self.metrics.registry_landed(n, layer, stretch.clone());
        self.got(n, layer, stretch);
        self.next_stretch(read);
    }

    /// `renewing`'s loop: renew at the first owner, unless the grant lapsed.
    fn renew_due(&mut self, read: usize, gen: u64) {
        let now = self.queue.now();
        let r = &self.reads[read];
        let Some(job) = r.job.as_ref().filter(|_| r.gen == gen) else {
            return;
        };
        let Some(left) = job.renewals.left(self.queue.instant(now)) else {
            return;
        };
        let (n, layer) = (r.node, r.layer);
        let span = job.span.clone();
        let every = job.renewals.every();
        let Some(&owner) = self.owners(n, layer).first() else {
            return;
        };
        if owner == n {
            let at = self.queue.instant(now);
            let node = &self.nodes[n];
            node.index.renew(
                at,
                node.addr,
                &self.blobs[layer],
                span.start,
                span.end - span.start,
            );
            if let Some(job) = self.reads[read].job.as_mut() {
                job.renewals.taken(at);
            }
            self.queue.at(now + every, Event::RenewDue { read, gen });
            return;
        }
        self.metrics.renewals += 1;
        let arrive = now + self.latency(n, owner);
        let at = self.owner_queue(owner, arrive);
        self.queue.at(
            at,
            Event::RenewAtOwner {
                read,
                gen,
                owner,
                sent: now,
                left,
            },
        );
    }
}
