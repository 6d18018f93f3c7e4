//! The simulated cluster: nodes with the daemon's membership, owner index and pace, their
//! reads, and the rounds of lookups each read goes through. Transfers are in
//! [`super::transfer`].

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::time::Duration;

use super::super::blockset::BlockSet;
use super::super::index::{Exclusions, OwnerIndex};
use super::super::member::{Membership, PeerAddr};
use super::super::pace::Pace;
use super::super::plan::{AfterRound, PeerFetchPlan, PeerStep};
use super::super::rendezvous;
use super::super::wire::Advice;
use super::super::WAIT_BUDGETS;
use super::clock::{Fifo, Queue, Rng};
use super::report::{Metrics, SimReport};
use super::transfer::{Race, RegistryJob};
use super::SimConfig;
use crate::digest::Digest;

/// A run stops here whatever happens: far past any bounded wait.
const TIME_LIMIT: Duration = Duration::from_secs(3600);
/// How often a node probes the members it took for unreachable (the daemon's default).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

pub(super) struct Node {
    pub addr: PeerAddr,
    pub members: Membership,
    pub index: OwnerIndex,
    pub pace: Pace,
    pub up: Fifo,
    pub down: Fifo,
    pub cpu: Fifo,
    pub latency: Duration,
    /// Uploads under way (the limiter's slots taken).
    pub uploads: usize,
    /// The next read of [`Cluster::order`] this node starts, and how many it has open.
    pub next_read: usize,
    pub reads_open: usize,
    /// Blocks it has, by layer.
    pub have: Vec<BlockSet>,
    pub blocks_had: u64,
    /// Members it penalised as unreachable, which its next probe brings back.
    pub unprobed: BTreeSet<usize>,
    pub started: Duration,
    pub finished: Option<Duration>,
}

/// One read: the fetcher's `fetch_remote` for a run of blocks, in rounds.
pub(super) struct Read {
    pub node: usize,
    pub layer: usize,
    pub started: Duration,
    pub remaining: Vec<u64>,
    pub deadline: Duration,
    pub plan: Option<PeerFetchPlan>,
    pub step: Option<PeerStep>,
    /// Bumped with every step and registry job: events of earlier ones are stale.
    pub gen: u64,
    pub races: Vec<Race>,
    pub open: usize,
    pub job: Option<RegistryJob>,
}

pub(super) enum Event {
    Start(usize),
    Ask(usize),
    Probe(usize),
    AtOwner {
        read: usize,
        gen: u64,
        owner: usize,
        blocks: Range<u64>,
    },
    Advice {
        read: usize,
        gen: u64,
        first: u64,
        advice: Vec<Advice>,
    },
    AtHolder {
        read: usize,
        gen: u64,
        race: usize,
        which: usize,
        holder: usize,
        sent: Duration,
    },
    Reply {
        read: usize,
        gen: u64,
        race: usize,
        which: usize,
        answer: super::transfer::Answer,
        sent: Duration,
    },
    HedgeDue {
        read: usize,
        gen: u64,
        race: usize,
    },
    UploadDone(usize),
    Landed {
        read: usize,
        gen: u64,
    },
    RenewDue {
        read: usize,
        gen: u64,
    },
    RenewAtOwner {
        read: usize,
        gen: u64,
        owner: usize,
        sent: Duration,
        left: Duration,
    },
    RenewReply {
        read: usize,
        gen: u64,
        sent: Duration,
        left: Duration,
    },
    AnnounceAtOwner {
        owner: usize,
        from: usize,
        layer: usize,
        blocks: BlockSet,
    },
}

pub(super) struct Cluster {
    pub config: SimConfig,
    pub queue: Queue<Event>,
    pub nodes: Vec<Node>,
    pub by_addr: HashMap<PeerAddr, usize>,
    pub blobs: Vec<Digest>,
    /// Every node's reads, in order: (layer, blocks).
    pub order: Vec<(usize, Range<u64>)>,
    pub reads: Vec<Read>,
    pub registry: Fifo,
    pub metrics: Metrics,
    /// Each layer's owners when every member is live.
    placement: Vec<Vec<usize>>,
}

/// The simulated node `n`'s address.
fn address(n: usize) -> PeerAddr {
    let [_, b, c, d] = (n as u32 + 1).to_be_bytes();
    PeerAddr(std::net::SocketAddr::from(([10, b, c, d], 7420)))
}

impl Cluster {
    pub fn new(config: SimConfig) -> Cluster {
        let mut rng = Rng::new(config.seed);
        let mut queue = Queue::new();
        let addrs: BTreeSet<PeerAddr> = (0..config.nodes).map(address).collect();
        let layers = config.layers.len();
        let nodes: Vec<Node> = (0..config.nodes)
            .map(|n| {
                let slow = if rng.unit() < config.slow_share {
                    config.slow_factor
                } else {
                    1.0
                };
                let members = Membership::default();
                members.set_known(addrs.clone());
                for &addr in &addrs {
                    members.probed(addr, true, addr == address(n));
                }
                Node {
                    addr: address(n),
                    members,
                    index: OwnerIndex::new(config.lease, config.latency_budget, 64 << 20),
                    pace: Pace::default(),
                    up: Fifo::new(config.upload_rate / slow),
                    down: Fifo::new(config.node_down / slow),
                    cpu: Fifo::new(1.0),
                    latency: rng.between(config.node_latency.0, config.node_latency.1),
                    uploads: 0,
                    next_read: 0,
                    reads_open: 0,
                    have: vec![BlockSet::new(); layers],
                    blocks_had: 0,
                    unprobed: BTreeSet::new(),
                    started: Duration::ZERO,
                    finished: None,
                }
            })
            .collect();
        for n in 0..config.nodes {
            queue.at(
                rng.between(Duration::ZERO, config.start_spread),
                Event::Start(n),
            );
        }
        let blobs: Vec<Digest> = (0..layers)
            .map(|l| Digest::of(format!("sim-layer-{}-{l}", config.seed).as_bytes()))
            .collect();
        // Reads go over the layers side by side, as a start reads files from all of them.
        let mut order = Vec::new();
        let longest = config.layers.iter().copied().max().unwrap_or(0);
        let step = config.read_blocks.max(1);
        for at in (0..longest).step_by(step as usize) {
            for (layer, &blocks) in config.layers.iter().enumerate() {
                if at < blocks {
                    order.push((layer, at..(at + step).min(blocks)));
                }
            }
        }
        let by_addr: HashMap<PeerAddr, usize> = nodes
            .iter()
            .enumerate()
            .map(|(n, node)| (node.addr, n))
            .collect();
        let everyone: Vec<PeerAddr> = addrs.iter().copied().collect();
        let placement = blobs
            .iter()
            .map(|blob| {
                rendezvous::owners(blob, &everyone, config.owners)
                    .iter()
                    .map(|addr| by_addr[addr])
                    .collect()
            })
            .collect();
        Cluster {
            placement,
            by_addr,
            registry: Fifo::new(config.registry_up),
            metrics: Metrics::new(config.nodes, &config.layers),
            config,
            queue,
            nodes,
            blobs,
            order,
            reads: Vec::new(),
        }
    }

    pub fn run(mut self) -> SimReport {
        while let Some(event) = self.queue.next() {
            if self.queue.now() > TIME_LIMIT {
                break;
            }
            self.metrics.events += 1;
            self.handle(event);
            if self.nodes.iter().all(|node| node.finished.is_some()) {
                break;
            }
        }
        SimReport::new(&self)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Start(n) => {
                self.nodes[n].started = self.queue.now();
                for _ in 0..self.config.concurrency {
                    self.open_read(n);
                }
                if self.nodes[n].reads_open == 0 {
                    self.nodes[n].finished = Some(self.queue.now());
                }
            }
            Event::Ask(read) => self.ask(read),
            Event::Probe(n) => {
                let node = &mut self.nodes[n];
                for member in std::mem::take(&mut node.unprobed) {
                    node.members.probed(address(member), true, false);
                }
            }
            Event::AtOwner {
                read,
                gen,
                owner,
                blocks,
            } => {
                let from = self.reads[read].node;
                let advice = self.owner_lookup(owner, from, self.reads[read].layer, blocks.clone());
                let at = self.queue.now() + self.latency(owner, from);
                self.queue.at(
                    at,
                    Event::Advice {
                        read,
                        gen,
                        first: blocks.start,
                        advice,
                    },
                );
            }
            Event::Advice {
                read,
                gen,
                first,
                advice,
            } => {
                if self.reads[read].gen == gen {
                    self.advised(read, first, &advice);
                }
            }
            other => self.handle_transfer(other),
        }
    }

    /// A request reaching `owner` at `arrive` waits for its CPU: when it is answered.
    pub fn owner_queue(&mut self, owner: usize, arrive: Duration) -> Duration {
        let at = self.nodes[owner]
            .cpu
            .serve(arrive, self.config.owner_service);
        self.metrics.owner_queue(at - arrive);
        at
    }

    /// One-way latency between two nodes.
    pub fn latency(&self, a: usize, b: usize) -> Duration {
        self.nodes[a].latency + self.nodes[b].latency
    }

    /// The owners of `layer`'s index as node `n` places them now.
    pub fn owners(&self, n: usize, layer: usize) -> Vec<usize> {
        let node = &self.nodes[n];
        // Placement over every member is the same for all: computed once (rendezvous hashes
        // each member per call, which dominated large runs). Members leave a node's live set
        // only when it takes them for unreachable (nothing here misleads or sends bad data).
        if node.unprobed.is_empty() {
            return self.placement[layer].clone();
        }
        let now = self.queue.instant(self.queue.now());
        rendezvous::owners(
            &self.blobs[layer],
            &node.members.live(now),
            self.config.owners,
        )
        .into_iter()
        .filter_map(|addr| self.by_addr.get(&addr).copied())
        .collect()
    }

    /// The owner's answer to `from`'s lookup, from its [`OwnerIndex`] as the listener gives it.
    fn owner_lookup(
        &mut self,
        owner: usize,
        from: usize,
        layer: usize,
        blocks: Range<u64>,
    ) -> Vec<Advice> {
        let now = self.queue.instant(self.queue.now());
        self.metrics.owner_request(owner, self.queue.now());
        let node = &self.nodes[owner];
        let excluded = Exclusions {
            holder: &|holder| node.members.is_out(holder, now),
            busy: &|holder| node.members.is_busy(holder, now),
            grantee: &|grantee| node.members.is_out(grantee, now),
        };
        node.index.lookup(
            now,
            Some(self.nodes[from].addr),
            &self.blobs[layer],
            blocks.start,
            blocks.end - blocks.start,
            &excluded,
        )
    }

    /// Starts node `n`'s next read, if it has one left.
    fn open_read(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let Some((layer, blocks)) = self.order.get(node.next_read).cloned() else {
            return;
        };
        node.next_read += 1;
        node.reads_open += 1;
        let now = self.queue.now();
        self.reads.push(Read {
            node: n,
            layer,
            started: now,
            remaining: blocks.collect(),
            deadline: now + self.config.latency_budget * WAIT_BUDGETS,
            plan: None,
            step: None,
            gen: 0,
            races: Vec::new(),
            open: 0,
            job: None,
        });
        self.begin_round(self.reads.len() - 1);
    }

    /// A round of `Peers::fetch` for what the read still lacks, or the read is done.
    pub fn begin_round(&mut self, read: usize) {
        let r = &mut self.reads[read];
        if r.remaining.is_empty() {
            let n = r.node;
            self.metrics.read_done(self.queue.now() - r.started);
            self.nodes[n].reads_open -= 1;
            self.open_read(n);
            let node = &mut self.nodes[n];
            if node.reads_open == 0 && node.finished.is_none() {
                node.finished = Some(self.queue.now());
            }
            return;
        }
        r.plan = Some(PeerFetchPlan::new(&r.remaining, self.config.latency_budget));
        self.ask(read);
    }

    /// The top of the round's loop: out of time, no owner, or a lookup.
    fn ask(&mut self, read: usize) {
        let now = self.queue.now();
        let r = &mut self.reads[read];
        r.gen += 1;
        let Some(asking) = r.plan.as_ref().and_then(PeerFetchPlan::asking) else {
            return self.give_up(read);
        };
        if now >= r.deadline {
            return self.give_up(read);
        }
        let (n, layer, gen) = (r.node, r.layer, r.gen);
        let Some(&owner) = self.owners(n, layer).first() else {
            return self.give_up(read);
        };
        self.metrics.lookups += 1;
        if owner == n {
            let advice = self.owner_lookup(owner, n, layer, asking.clone());
            return self.advised(read, asking.start, &advice);
        }
        let arrive = now + self.latency(n, owner);
        let at = self.owner_queue(owner, arrive);
        self.queue.at(
            at,
            Event::AtOwner {
                read,
                gen,
                owner,
                blocks: asking,
            },
        );
    }

    /// The plan takes the owner's advice; requests go out, or the round moves on.
    fn advised(&mut self, read: usize, first: u64, advice: &[Advice]) {
        let now = self.queue.instant(self.queue.now());
        let r = &mut self.reads[read];
        let node = &self.nodes[r.node];
        let Some(plan) = r.plan.as_mut() else {
            return;
        };
        let step = plan.advise(now, first, advice, Some(node.addr), &node.members);
        self.metrics.fallbacks += step.fallbacks;
        self.metrics.busy_expired += step.busy_expired;
        let runs = step.runs.clone();
        r.step = Some(step);
        r.races.clear();
        r.open = runs.len();
        if runs.is_empty() {
            return self.after_round(read);
        }
        for run in runs {
            self.start_race(read, run);
        }
    }

    /// Every request of the round was answered: what the plan says follows.
    pub fn after_round(&mut self, read: usize) {
        let r = &mut self.reads[read];
        let (Some(plan), Some(step)) = (r.plan.as_mut(), r.step.take()) else {
            return;
        };
        for race in &r.races {
            plan.answered(&step, &race.run, &race.answer());
        }
        match plan.after(&step) {
            AfterRound::Registry => {
                let plan = r.plan.take().expect("the plan is there");
                let (fetch, waiting) = plan.registry_first();
                r.remaining = waiting;
                self.fetch_registry(read, fetch);
            }
            AfterRound::Ask => self.ask(read),
            AfterRound::Pause(pause) => {
                let at = (self.queue.now() + pause).min(r.deadline);
                self.metrics.waits += 1;
                self.queue.at(at, Event::Ask(read));
            }
            AfterRound::Stop => self.give_up(read),
        }
    }

    /// The round ends with every block not got going to the registry.
    fn give_up(&mut self, read: usize) {
        let r = &mut self.reads[read];
        let Some(plan) = r.plan.take() else {
            return;
        };
        if self.queue.now() > r.deadline {
            self.metrics.late_rounds += 1;
        }
        let (fetch, fallbacks) = plan.give_up();
        self.metrics.fallbacks += fallbacks;
        r.remaining.clear();
        self.fetch_registry(read, fetch);
    }

    /// Node `n` got `blocks` of `layer` (from a peer or the registry): it has them, and
    /// announces them to the layer's owners.
    pub fn got(&mut self, n: usize, layer: usize, blocks: Range<u64>) {
        let node = &mut self.nodes[n];
        let mut fresh = BlockSet::new();
        for index in blocks {
            if node.have[layer].contains(index) {
                self.metrics.duplicates += 1;
            } else {
                node.have[layer].insert(index);
                node.blocks_had += 1;
                fresh.insert(index);
            }
        }
        let now = self.queue.now();
        for owner in self.owners(n, layer) {
            if owner == n {
                let at = self.queue.instant(now);
                self.nodes[n].index.announce(
                    at,
                    self.nodes[n].addr,
                    &self.blobs[layer],
                    &fresh,
                    false,
                );
                continue;
            }
            let arrive = now + self.latency(n, owner);
            let at = self.owner_queue(owner, arrive);
            self.queue.at(
                at,
                Event::AnnounceAtOwner {
                    owner,
                    from: n,
                    layer,
                    blocks: fresh.clone(),
                },
            );
        }
    }

    /// Node `n` penalised `member` as unreachable: its next probe finds it alive again.
    pub fn unreachable(&mut self, n: usize, member: usize) {
        let node = &mut self.nodes[n];
        if node.unprobed.insert(member) {
            let now = self.queue.now().as_nanos() as u64;
            let every = PROBE_INTERVAL.as_nanos() as u64;
            let next = Duration::from_nanos((now / every + 1) * every);
            self.queue.at(next, Event::Probe(n));
        }
    }
}
