//! Membership upkeep: resolving `peers.static` and `peers.dns` every `refresh`, probing every
//! member's `/health` every `probe_interval`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{debug, info, warn};

use super::member::PeerAddr;
use super::Peers;

/// Runs until the runtime shuts down.
pub async fn run(peers: Arc<Peers>) {
    let mut resolved_at: Option<Instant> = None;
    let mut ticker = tokio::time::interval(peers.config.probe_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_live = Vec::new();
    loop {
        ticker.tick().await;
        if resolved_at.is_none_or(|at| at.elapsed() >= peers.config.refresh) {
            let known = resolve(&peers).await;
            if known.is_empty() {
                warn!("no peer address resolved; fetching from the registry only");
            }
            peers.members.set_known(known);
            resolved_at = Some(Instant::now());
        }
        probe_all(&peers).await;
        let live = peers.members.live(Instant::now());
        if live != last_live {
            let me = peers.members.me();
            let (joined, left) = changes(&last_live, &live, me);
            for peer in joined {
                info!(peer = %peer, "peer joined");
            }
            for peer in left {
                info!(peer = %peer, "peer left");
            }
            info!(live = ?live, me = ?me, "peer membership changed");
            // New owners must learn what this node holds now, not at the next renewal.
            peers.announcer.renew_all();
            // Reported only now, so that whoever sees the new membership in the status also
            // sees the renewal it causes as pending.
            peers
                .members_live
                .store(live.len() as u64, std::sync::atomic::Ordering::Relaxed);
            last_live = live;
        }
    }
}

/// The peers live now but not before, and those live before but not now (it stopped
/// answering probes, or is avoided for a while after failures); this node itself, once it
/// has found its own address, is neither.
fn changes(
    before: &[PeerAddr],
    now: &[PeerAddr],
    me: Option<PeerAddr>,
) -> (Vec<PeerAddr>, Vec<PeerAddr>) {
    let others = |of: &[PeerAddr]| -> BTreeSet<PeerAddr> {
        of.iter()
            .copied()
            .filter(|addr| Some(*addr) != me)
            .collect()
    };
    let (before, now) = (others(before), others(now));
    (
        now.difference(&before).copied().collect(),
        before.difference(&now).copied().collect(),
    )
}

async fn resolve(peers: &Peers) -> BTreeSet<PeerAddr> {
    let names = peers
        .config
        .static_peers
        .iter()
        .chain(peers.config.dns.iter());
    let lookups = names.map(|name| async move {
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(name)).await {
            Ok(Ok(addrs)) => addrs.map(PeerAddr).collect::<Vec<_>>(),
            Ok(Err(error)) => {
                warn!(name, %error, "cannot resolve peer name");
                Vec::new()
            }
            Err(_) => {
                warn!(name, "resolving peer name timed out");
                Vec::new()
            }
        }
    });
    join_all(lookups).await.into_iter().flatten().collect()
}

async fn probe_all(peers: &Peers) {
    let timeout = peers.config.probe_timeout;
    let probes = peers.members.known().into_iter().map(|addr| async move {
        let answer = peers.client.health(addr, timeout).await;
        (addr, answer)
    });
    for (addr, answer) in join_all(probes).await {
        match answer {
            Ok(health) => peers
                .members
                .probed(addr, true, health.node == peers.node.0),
            Err(failure) => {
                debug!(peer = %addr, %failure, "peer probe failed");
                peers.members.probed(addr, false, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_and_leaves_are_the_differences_of_the_live_sets() {
        let addr = |port: u16| PeerAddr(([10, 0, 0, 1], port).into());
        let (joined, left) = changes(
            &[addr(1), addr(2), addr(9)],
            &[addr(2), addr(3), addr(9)],
            Some(addr(9)),
        );
        assert!(joined == [addr(3)] && left == [addr(1)]);
        // This node finding itself is no peer joining.
        assert_eq!(changes(&[], &[addr(9)], Some(addr(9))), (vec![], vec![]));
    }

    fn no_registry() -> std::sync::Arc<parking_lot::RwLock<crate::registry::RegistryClient>> {
        let client = crate::registry::RegistryClient::with_credentials(
            &shoal_config::Config::parse("").unwrap().registry,
            crate::registry::Credentials::default(),
        )
        .unwrap();
        std::sync::Arc::new(parking_lot::RwLock::new(client))
    }

    #[tokio::test]
    async fn static_names_and_the_dns_name_resolve_to_members() {
        let config = shoal_config::Config::parse(
            "[peers]\nlisten = \"127.0.0.1:7420\"\nstatic = [\"127.0.0.2:7420\"]\ndns = \"localhost:7421\"",
        )
        .unwrap()
        .peers
        .unwrap();
        let peers = Peers::new(&config, 1 << 20, None, no_registry()).unwrap();
        let known = resolve(&peers).await;
        assert!(
            known.contains(&"127.0.0.2:7420".parse().unwrap()),
            "{known:?}"
        );
        assert!(
            known.contains(&"127.0.0.1:7421".parse().unwrap())
                || known.contains(&"[::1]:7421".parse().unwrap()),
            "{known:?}"
        );
    }

    #[tokio::test]
    async fn a_member_that_stops_answering_drops_out_after_a_few_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = shoal_config::Config::parse(&format!(
            "[peers]\nlisten = \"127.0.0.1:7420\"\nstatic = [\"{addr}\"]\nprobe_interval_ms = 200\nprobe_timeout_ms = 100"
        ))
        .unwrap()
        .peers
        .unwrap();
        let peers = Peers::new(&config, 1 << 20, None, no_registry()).unwrap();
        peers.members.set_known(resolve(&peers).await);
        // A listener that accepts and never answers: the probe times out.
        peers.members.probed(PeerAddr(addr), true, false);
        assert_eq!(peers.members.live(Instant::now()).len(), 1);
        let started = Instant::now();
        for _ in 1..super::super::member::MISSES_TO_LEAVE {
            probe_all(&peers).await;
        }
        assert_eq!(peers.members.live(Instant::now()).len(), 1);
        probe_all(&peers).await;
        assert!(peers.members.live(Instant::now()).is_empty());
        // Each miss was a probe waited out in full, not a member dropped at once.
        assert!(started.elapsed() >= Duration::from_millis(300));
        drop(listener);
    }
}
