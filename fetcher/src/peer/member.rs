//! Membership: the nodes named by `peers.static` and `peers.dns`, which of them answer their
//! `/health` probe, which one is this node, and which ones it avoids for a while (busy, gone,
//! or caught sending bad bytes).

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A node's peer listener address, which is also its name among the members.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr(pub SocketAddr);

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for PeerAddr {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<PeerAddr, Self::Err> {
        text.parse().map(PeerAddr)
    }
}

/// A random id this process answers `/health` with, so that it recognises its own address in
/// the member list.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeId(pub String);

impl NodeId {
    pub fn random() -> NodeId {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        NodeId(format!("{:016x}", hasher.finish()))
    }
}

/// Why a peer is avoided, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Penalty {
    /// It answered "busy".
    Busy,
    /// A request to it failed (refused, reset, timed out).
    Unreachable,
    /// Bytes it sent failed verification.
    BadData,
    /// As an index owner it kept naming holders that do not hold the blocks.
    Misleading,
}

impl Penalty {
    fn duration(self) -> Duration {
        match self {
            Penalty::Busy => Duration::from_millis(500),
            Penalty::Unreachable => Duration::from_secs(5),
            Penalty::BadData => Duration::from_secs(600),
            Penalty::Misleading => Duration::from_secs(60),
        }
    }
}

#[derive(Default)]
pub struct Membership {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every address the configuration resolves to.
    known: BTreeSet<PeerAddr>,
    /// Those that answered their last probe.
    live: BTreeSet<PeerAddr>,
    me: Option<PeerAddr>,
    /// Members avoided for a failure or bad data, until then: out of index placement too.
    avoid: HashMap<PeerAddr, Instant>,
    /// Members that answered "busy", until then: not asked for blocks, but still members.
    busy: HashMap<PeerAddr, Instant>,
    /// Probes missed in a row by live members.
    misses: HashMap<PeerAddr, u32>,
    /// Owners' advice that led nowhere: how often, since when.
    strikes: HashMap<PeerAddr, (u32, Instant)>,
}

/// A live member leaves after this many probes in a row go unanswered: one missed probe is
/// more often a starved CPU than a dead node, and a member that leaves takes its index
/// ownership and its fetch grants with it, which sends waiting nodes to the registry.
pub const MISSES_TO_LEAVE: u32 = 3;

/// An owner whose advice names holders that do not hold the blocks this often within
/// [`STRIKE_WINDOW`] is avoided as [`Penalty::Misleading`]. An honest owner is wrong now and
/// then (a holder evicted blocks since it last announced), rarely this often.
const MAX_STRIKES: u32 = 4;
const STRIKE_WINDOW: Duration = Duration::from_secs(30);

impl Membership {
    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    pub fn set_known(&self, known: BTreeSet<PeerAddr>) {
        let mut state = self.lock();
        state.live.retain(|addr| known.contains(addr));
        state.known = known;
    }

    /// Whether the configuration names `addr` (by `static` or `dns`, as last resolved).
    pub fn is_known(&self, addr: &PeerAddr) -> bool {
        self.lock().known.contains(addr)
    }

    /// Whether some member named by the configuration has address `ip`: how a listener
    /// without TLS tells a member's request from anyone else's.
    pub fn has_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.lock()
            .known
            .iter()
            .any(|member| member.0.ip().to_canonical() == ip)
    }

    pub fn known(&self) -> Vec<PeerAddr> {
        self.lock().known.iter().copied().collect()
    }

    /// Records a probe's outcome; `is_me` when the member answered with this node's id.
    pub fn probed(&self, addr: PeerAddr, alive: bool, is_me: bool) {
        let mut state = self.lock();
        if is_me {
            state.me = Some(addr);
        }
        if !state.known.contains(&addr) {
            state.live.remove(&addr);
            state.misses.remove(&addr);
        } else if alive {
            state.live.insert(addr);
            state.misses.remove(&addr);
        } else {
            let misses = state.misses.entry(addr).or_insert(0);
            *misses += 1;
            if *misses >= MISSES_TO_LEAVE {
                state.live.remove(&addr);
            }
        }
    }

    pub fn me(&self) -> Option<PeerAddr> {
        self.lock().me
    }

    /// Live members, this node included once it has found itself, avoided ones left out:
    /// the set rendezvous placement runs over.
    pub fn live(&self, now: Instant) -> Vec<PeerAddr> {
        let state = self.lock();
        state
            .live
            .iter()
            .filter(|addr| Some(**addr) == state.me || !avoided(&state, addr, now))
            .copied()
            .collect()
    }

    /// Whether `addr` is not to be asked for blocks now: not live, penalised, or busy.
    pub fn is_avoided(&self, addr: &PeerAddr, now: Instant) -> bool {
        let state = self.lock();
        !state.live.contains(addr)
            || avoided(&state, addr, now)
            || state.busy.get(addr).is_some_and(|until| *until > now)
    }

    /// Whether `addr` is out of the cluster for now: not live, or penalised for more than
    /// being busy. Busy members keep their place as index owners and their fetch grants.
    pub fn is_out(&self, addr: &PeerAddr, now: Instant) -> bool {
        let state = self.lock();
        !state.live.contains(addr) || avoided(&state, addr, now)
    }

    /// Whether `addr` answered "busy" lately (and is otherwise fine).
    pub fn is_busy(&self, addr: &PeerAddr, now: Instant) -> bool {
        let state = self.lock();
        state.live.contains(addr)
            && !avoided(&state, addr, now)
            && state.busy.get(addr).is_some_and(|until| *until > now)
    }

    pub fn penalise(&self, addr: PeerAddr, penalty: Penalty, now: Instant) {
        let mut state = self.lock();
        let until = now + penalty.duration();
        let map = match penalty {
            Penalty::Busy => &mut state.busy,
            _ => &mut state.avoid,
        };
        let entry = map.entry(addr).or_insert(until);
        *entry = (*entry).max(until);
        if penalty == Penalty::Unreachable {
            state.live.remove(&addr);
        }
    }

    /// Counts advice from owner `addr` that named holders without the blocks; true when that
    /// made it [`Penalty::Misleading`].
    pub fn strike(&self, addr: PeerAddr, now: Instant) -> bool {
        let mut state = self.lock();
        let (count, since) = state.strikes.entry(addr).or_insert((0, now));
        if now.duration_since(*since) > STRIKE_WINDOW {
            (*count, *since) = (0, now);
        }
        *count += 1;
        if *count < MAX_STRIKES {
            return false;
        }
        state.strikes.remove(&addr);
        drop(state);
        self.penalise(addr, Penalty::Misleading, now);
        true
    }
}

fn avoided(state: &State, addr: &PeerAddr, now: Instant) -> bool {
    state.avoid.get(addr).is_some_and(|until| *until > now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> PeerAddr {
        PeerAddr(format!("10.0.0.{i}:7420").parse().unwrap())
    }

    #[test]
    fn dead_and_penalised_members_drop_out_until_they_recover() {
        let members = Membership::default();
        members.set_known((1..=3).map(addr).collect());
        for i in 1..=3 {
            members.probed(addr(i), true, i == 1);
        }
        let now = Instant::now();
        assert_eq!(members.live(now), [addr(1), addr(2), addr(3)]);
        assert_eq!(members.me(), Some(addr(1)));
        // A missed probe or two is a busy node; the third in a row, a dead one.
        for _ in 1..MISSES_TO_LEAVE {
            members.probed(addr(2), false, false);
        }
        assert_eq!(members.live(now), [addr(1), addr(2), addr(3)]);
        members.probed(addr(2), false, false);
        assert_eq!(members.live(now), [addr(1), addr(3)]);
        members.penalise(addr(3), Penalty::BadData, now);
        assert_eq!(members.live(now), [addr(1)]);
        assert!(members.is_avoided(&addr(3), now) && members.is_out(&addr(3), now));
        assert!(!members.is_avoided(&addr(3), now + Duration::from_secs(601)));
        members.probed(addr(2), true, false);
        assert_eq!(members.live(now), [addr(1), addr(2)]);
        // A member the configuration no longer names is gone, probe or not.
        members.set_known([addr(1)].into_iter().collect());
        members.probed(addr(2), true, false);
        assert_eq!(members.live(now), [addr(1)]);
    }

    #[test]
    fn members_are_recognised_by_address_whatever_their_port() {
        let members = Membership::default();
        assert!(
            !members.has_ip("10.0.0.1".parse().unwrap()),
            "nobody before resolving"
        );
        members.set_known((1..=2).map(addr).collect());
        assert!(members.has_ip("10.0.0.2".parse().unwrap()));
        assert!(members.has_ip("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!members.has_ip("10.0.0.3".parse().unwrap()));
        assert!(members.is_known(&addr(1)) && !members.is_known(&addr(7)));
    }

    #[test]
    fn a_busy_member_is_not_asked_for_blocks_but_stays_a_member() {
        let members = Membership::default();
        members.set_known((1..=2).map(addr).collect());
        members.probed(addr(1), true, true);
        members.probed(addr(2), true, false);
        let now = Instant::now();
        members.penalise(addr(2), Penalty::Busy, now);
        assert!(members.is_avoided(&addr(2), now));
        assert!(!members.is_out(&addr(2), now) && members.is_busy(&addr(2), now));
        assert_eq!(members.live(now), [addr(1), addr(2)]);
        assert!(!members.is_avoided(&addr(2), now + Duration::from_secs(1)));
    }

    #[test]
    fn an_owner_whose_advice_keeps_leading_nowhere_is_avoided_for_a_while() {
        let members = Membership::default();
        members.set_known((1..=2).map(addr).collect());
        members.probed(addr(1), true, true);
        members.probed(addr(2), true, false);
        let t0 = Instant::now();
        // Strikes far apart are forgiven.
        for n in 0..6 {
            assert!(!members.strike(addr(2), t0 + STRIKE_WINDOW * 2 * n));
        }
        let t1 = t0 + STRIKE_WINDOW * 20;
        let struck: Vec<bool> = (0..MAX_STRIKES)
            .map(|_| members.strike(addr(2), t1))
            .collect();
        assert_eq!(struck.last(), Some(&true));
        assert!(struck[..struck.len() - 1].iter().all(|s| !s));
        assert!(members.is_avoided(&addr(2), t1));
        assert_eq!(members.live(t1), [addr(1)]);
        assert!(!members.is_avoided(&addr(2), t1 + Duration::from_secs(61)));
    }
}
