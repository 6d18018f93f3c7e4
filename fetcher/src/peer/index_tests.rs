use super::*;

fn addr(i: u8) -> PeerAddr {
    PeerAddr(format!("10.0.0.{i}:7420").parse().unwrap())
}

fn blocks(indices: &[u64]) -> BlockSet {
    let mut set = BlockSet::new();
    for &i in indices {
        set.insert(i);
    }
    set
}

const NONE: Exclusions<'static> = Exclusions {
    holder: &|_| false,
    busy: &|_| false,
    grantee: &|_| false,
};

#[test]
fn first_asker_fetches_and_the_herd_waits_then_follows() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    assert_eq!(
        index.lookup(t0, Some(addr(1)), &blob, 0, 1, &NONE),
        [Advice::Fetch]
    );
    for asker in 2..5 {
        assert_eq!(
            index.lookup(t0, Some(addr(asker)), &blob, 0, 1, &NONE),
            [Advice::Wait {
                holder: addr(1).to_string(),
                retry_ms: 20
            }]
        );
    }
    index.announce(t0, addr(1), &blob, &blocks(&[0]), false);
    assert_eq!(
        index.lookup(t0, Some(addr(2)), &blob, 0, 1, &NONE),
        [Advice::Holders {
            holders: vec![addr(1).to_string()]
        }]
    );
}

#[test]
fn an_expired_grant_passes_to_the_next_asker() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    index.lookup(t0, Some(addr(1)), &blob, 0, 1, &NONE);
    let later = t0 + Duration::from_secs(3);
    assert_eq!(
        index.lookup(later, Some(addr(2)), &blob, 0, 1, &NONE),
        [Advice::Fetch]
    );
    // A grantee that is known dead does not hold the others back either.
    let dead = |a: &PeerAddr| *a == addr(2);
    let without_dead = Exclusions {
        holder: &dead,
        busy: &|_| false,
        grantee: &dead,
    };
    assert_eq!(
        index.lookup(later, Some(addr(3)), &blob, 0, 1, &without_dead),
        [Advice::Fetch]
    );
}

#[test]
fn a_grantee_still_fetching_keeps_its_grant_and_nobody_else_can_extend_it() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    index.lookup(t0, Some(addr(1)), &blob, 0, 2, &NONE);
    // The grantee renews block 0 only; a waiter's renewal of block 1 counts for nothing.
    let t1 = t0 + Duration::from_millis(1500);
    index.renew(t1, addr(1), &blob, 0, 1);
    index.renew(t1, addr(2), &blob, 1, 1);
    let t2 = t0 + Duration::from_millis(2500);
    let wait = Advice::Wait {
        holder: addr(1).to_string(),
        retry_ms: 20,
    };
    assert_eq!(
        index.lookup(t2, Some(addr(3)), &blob, 0, 2, &NONE),
        [wait, Advice::Fetch]
    );
    // Renewing a blob the owner never heard of is harmless.
    index.renew(t2, addr(1), &Digest::of(b"other"), 0, 4);
}

#[test]
fn leases_expire_unless_renewed() {
    let index = OwnerIndex::new(Duration::from_secs(10), Duration::from_secs(2), 1 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    index.announce(t0, addr(1), &blob, &blocks(&[0, 1]), false);
    index.announce(t0, addr(2), &blob, &blocks(&[1]), false);
    let t1 = t0 + Duration::from_secs(8);
    index.announce(t1, addr(2), &blob, &blocks(&[1]), true);
    let t2 = t0 + Duration::from_secs(11);
    let advice = index.lookup(t2, Some(addr(3)), &blob, 0, 2, &NONE);
    assert_eq!(advice[0], Advice::Fetch, "addr 1's lease expired");
    assert_eq!(
        advice[1],
        Advice::Holders {
            holders: vec![addr(2).to_string()]
        }
    );
}

#[test]
fn announcements_merge_or_replace() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    index.announce(t0, addr(1), &blob, &blocks(&[0]), false);
    index.announce(t0, addr(1), &blob, &blocks(&[2]), false);
    let held = |index: &OwnerIndex| {
        index
            .lookup(t0, Some(addr(9)), &blob, 0, 3, &NONE)
            .iter()
            .map(|a| matches!(a, Advice::Holders { .. }))
            .collect::<Vec<_>>()
    };
    assert_eq!(held(&index), [true, false, true]);
    index.announce(t0, addr(1), &blob, &blocks(&[1]), true);
    assert_eq!(held(&index), [false, true, false]);
}

#[test]
fn least_loaded_holder_comes_first_and_the_asker_is_never_named() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    index.announce(t0, addr(1), &blob, &blocks(&[0]), false);
    index.announce(t0, addr(2), &blob, &blocks(&[0]), false);
    let first = |asker| match &index.lookup(t0, Some(addr(asker)), &blob, 0, 1, &NONE)[0] {
        Advice::Holders { holders } => holders.clone(),
        other => panic!("{other:?}"),
    };
    let a = first(5);
    let b = first(6);
    assert_ne!(a[0], b[0], "hand-outs alternate between equal holders");
    assert_eq!(first(1), [addr(2).to_string()]);
}

#[test]
fn busy_holders_are_named_last_and_a_lone_busy_holder_still_is() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 1 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    index.announce(t0, addr(1), &blob, &blocks(&[0, 1]), false);
    index.announce(t0, addr(2), &blob, &blocks(&[0]), false);
    let busy = |a: &PeerAddr| *a == addr(1);
    let excluded = Exclusions {
        holder: &|_| false,
        busy: &busy,
        grantee: &|_| false,
    };
    let holders = |advice: &Advice| match advice {
        Advice::Holders { holders } => holders.clone(),
        other => panic!("{other:?}"),
    };
    for _ in 0..3 {
        let advice = index.lookup(t0, Some(addr(9)), &blob, 0, 2, &excluded);
        assert_eq!(
            holders(&advice[0]),
            [addr(2).to_string(), addr(1).to_string()]
        );
        // Not a second registry fetch of a block the cluster has.
        assert_eq!(holders(&advice[1]), [addr(1).to_string()]);
    }
}

/// The `n`th of many nodes.
fn node(n: u32) -> PeerAddr {
    let [_, b, c, d] = (n + 1).to_be_bytes();
    PeerAddr(std::net::SocketAddr::from(([10, b, c, d], 7420)))
}

#[test]
fn a_thousand_holders_are_remembered_and_an_answer_names_a_few_spread_over_them() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 64 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    // The first holder alone has block 1; a thousand announce block 0 after it.
    index.announce(t0, node(0), &blob, &blocks(&[0, 1]), false);
    for n in 1..1000 {
        let at = t0 + Duration::from_micros(u64::from(n));
        index.announce(at, node(n), &blob, &blocks(&[0]), false);
    }
    let t1 = t0 + Duration::from_millis(10);
    let names = |advice: &Advice| match advice {
        Advice::Holders { holders } => holders.clone(),
        other => panic!("{other:?}"),
    };
    let advice = index.lookup(t1, Some(node(5000)), &blob, 0, 2, &NONE);
    assert_eq!(names(&advice[0]).len(), NAMED_HOLDERS);
    assert_eq!(
        names(&advice[1]),
        [node(0).to_string()],
        "the stalest of a thousand holders is not forgotten"
    );
    // Hand-outs go to the least handed out first: a herd of askers is spread.
    let mut first = std::collections::HashSet::new();
    for asker in 0..500 {
        let advice = index.lookup(t1, Some(node(2000 + asker)), &blob, 0, 1, &NONE);
        let named = names(&advice[0]);
        assert_eq!(named.len(), NAMED_HOLDERS);
        first.insert(named[0].clone());
    }
    assert_eq!(
        first.len(),
        500,
        "no holder handed out twice before all once"
    );
}

#[test]
fn busy_holders_are_named_after_free_ones_among_many() {
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), 64 << 20);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    for n in 0..100 {
        index.announce(t0, node(n), &blob, &blocks(&[0]), false);
    }
    // All but three are busy: those three come first.
    let busy = |a: &PeerAddr| ![node(7), node(42), node(99)].contains(a);
    let excluded = Exclusions {
        holder: &|_| false,
        busy: &busy,
        grantee: &|_| false,
    };
    match &index.lookup(t0, Some(node(500)), &blob, 0, 1, &excluded)[0] {
        Advice::Holders { holders } => {
            let mut free = holders[..3].to_vec();
            free.sort();
            let mut want = [node(7), node(42), node(99)]
                .map(|a| a.to_string())
                .to_vec();
            want.sort();
            assert_eq!((free, holders.len()), (want, NAMED_HOLDERS));
        }
        other => panic!("{other:?}"),
    }
}

/// A block set of `blocks` blocks, all held, as a flood of announcements would send.
fn full(blocks: u64) -> BlockSet {
    BlockSet::from_hex(&"f".repeat((blocks / 4) as usize)).unwrap()
}

#[test]
fn the_index_stays_under_its_cap_by_forgetting_the_least_recently_touched_blobs() {
    let cap = 1 << 20;
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), cap);
    let t0 = Instant::now();
    // 100 blobs with 128 KiB block sets each: 12.5 MiB announced into a 1 MiB index.
    let big = full(1 << 20);
    let kept = Digest::of(b"kept");
    index.announce(t0, addr(1), &kept, &blocks(&[0]), false);
    for n in 0..100u32 {
        index.announce(t0, addr(2), &Digest::of(&n.to_le_bytes()), &big, false);
        // A blob asked about all along stays in.
        index.lookup(t0, Some(addr(3)), &kept, 0, 1, &NONE);
        let usage = index.usage();
        assert!(usage.bytes <= cap as u64, "{usage:?} after {n}");
    }
    let usage = index.usage();
    assert!(usage.blobs < 10 && usage.evictions > 90, "{usage:?}");
    assert_eq!(usage.blobs + usage.evictions, 101);
    let newest = Digest::of(&99u32.to_le_bytes());
    let held = |blob: &Digest| {
        matches!(
            index.lookup(t0, Some(addr(4)), blob, 0, 1, &NONE)[0],
            Advice::Holders { .. }
        )
    };
    assert!(held(&newest) && held(&kept));
    assert!(
        !held(&Digest::of(&0u32.to_le_bytes())),
        "the oldest was forgotten"
    );
}

#[test]
fn one_blob_larger_than_the_cap_keeps_only_its_freshest_holders() {
    let cap = 1 << 20;
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), cap);
    let blob = Digest::of(b"blob");
    let t0 = Instant::now();
    for i in 1..=20u8 {
        let at = t0 + Duration::from_millis(u64::from(i));
        index.announce(at, addr(i), &blob, &full(1 << 20), false);
    }
    let usage = index.usage();
    assert!(usage.bytes <= cap as u64 && usage.blobs == 1, "{usage:?}");
    match &index.lookup(t0, Some(addr(99)), &blob, 0, 1, &NONE)[0] {
        Advice::Holders { holders } => {
            assert!(holders.contains(&addr(20).to_string()) && holders.len() < 10)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn lookups_of_blobs_nobody_holds_are_costed_too() {
    let cap = 1 << 20;
    let index = OwnerIndex::new(Duration::from_secs(60), Duration::from_secs(2), cap);
    let t0 = Instant::now();
    for n in 0..1000u32 {
        index.lookup(
            t0,
            Some(addr(1)),
            &Digest::of(&n.to_le_bytes()),
            0,
            1024,
            &NONE,
        );
    }
    let usage = index.usage();
    assert!(
        usage.bytes <= cap as u64 && usage.evictions > 0,
        "{usage:?}"
    );
}
