//! Rendezvous (highest random weight) placement: which members own a blob's index.
//!
//! Every node computes the same owners from the same live members without talking to each
//! other, and when a member dies only the blobs it owned move.

use sha2::{Digest as _, Sha256};

use super::member::PeerAddr;
use crate::digest::Digest;

/// The `count` members with the highest weight for `blob`, best first.
pub fn owners(blob: &Digest, members: &[PeerAddr], count: usize) -> Vec<PeerAddr> {
    let mut weighted: Vec<(u64, PeerAddr)> = members
        .iter()
        .map(|member| (weight(blob, member), *member))
        .collect();
    // Ties (practically impossible) are broken by address so every node agrees.
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    weighted.dedup_by_key(|(_, member)| *member);
    weighted
        .into_iter()
        .take(count)
        .map(|(_, member)| member)
        .collect()
}

fn weight(blob: &Digest, member: &PeerAddr) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(blob.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(member.to_string().as_bytes());
    let hash = hasher.finalize();
    let mut word = [0u8; 8];
    word.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u8) -> Vec<PeerAddr> {
        (1..=n)
            .map(|i| PeerAddr(format!("10.0.0.{i}:7420").parse().unwrap()))
            .collect()
    }

    #[test]
    fn placement_does_not_depend_on_member_order() {
        let blob = Digest::of(b"layer");
        let mut shuffled = members(8);
        shuffled.reverse();
        shuffled.swap(1, 5);
        assert_eq!(owners(&blob, &members(8), 2), owners(&blob, &shuffled, 2));
        assert_eq!(owners(&blob, &members(8), 2).len(), 2);
        assert_eq!(owners(&blob, &members(1), 2).len(), 1);
    }

    #[test]
    fn placement_spreads_blobs_over_members() {
        let all = members(4);
        let mut firsts = std::collections::HashMap::new();
        for i in 0..400u32 {
            let blob = Digest::of(&i.to_le_bytes());
            *firsts.entry(owners(&blob, &all, 1)[0]).or_insert(0) += 1;
        }
        assert_eq!(firsts.len(), 4);
        assert!(firsts.values().all(|&n| n > 50), "{firsts:?}");
    }

    #[test]
    fn owner_failover_moves_only_the_dead_members_blobs() {
        let all = members(5);
        for i in 0..200u32 {
            let blob = Digest::of(&i.to_le_bytes());
            let before = owners(&blob, &all, 2);
            let dead = before[0];
            let live: Vec<PeerAddr> = all.iter().copied().filter(|m| *m != dead).collect();
            let after = owners(&blob, &live, 2);
            // The second owner, which already holds the announcements, takes over first.
            assert_eq!(after[0], before[1]);
            assert!(!after.contains(&dead));
            // A blob the dead member did not own keeps its owners.
            let other = all.iter().copied().find(|m| !before.contains(m)).unwrap();
            let without_other: Vec<PeerAddr> =
                all.iter().copied().filter(|m| *m != other).collect();
            assert_eq!(owners(&blob, &without_other, 2), before);
        }
    }
}
