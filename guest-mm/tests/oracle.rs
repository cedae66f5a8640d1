//! Property test: random map / unmap / protect / fault / deflate sequences
//! (4K, 2M and 1G leaves, splits) checked against a simple interval oracle.
//!
//! Rules guarded (`GMM_BREAK_RULE`, feature `mutation`): `unhook_order` (the
//! order log sees a release outside its invalidation) and `grace_period`
//! (the log sees a release with no grace period completed since its
//! invalidation started); plus the table/oracle agreement itself, which
//! also catches `leaf_clear` and `leaf_kept` (a removed page translates).

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

mod common;

use std::collections::BTreeMap;

use common::*;
use guest_mm::*;
use proptest::prelude::*;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Present,
    Discarded,
    Ballooned,
}

#[derive(Clone, Copy, Debug)]
struct Seg {
    end: u64,
    hva: u64,
    perms: Perms,
    kind: Kind,
}

#[derive(Default)]
struct Oracle {
    m: BTreeMap<u64, Seg>,
}

impl Oracle {
    fn split_at(&mut self, a: u64) {
        if let Some((&s, &seg)) = self.m.range(..a).next_back() {
            if seg.end > a {
                self.m.insert(s, Seg { end: a, ..seg });
                self.m.insert(
                    a,
                    Seg {
                        hva: seg.hva + (a - s),
                        ..seg
                    },
                );
            }
        }
    }
    fn get(&self, a: u64) -> Option<(u64, Perms, Kind)> {
        let (&s, seg) = self.m.range(..=a).next_back()?;
        (seg.end > a).then(|| (seg.hva + (a - s), seg.perms, seg.kind))
    }
    fn covered(&self, s: u64, e: u64) -> u64 {
        let mut n = 0;
        let first = self.m.range(..s).next_back().map(|(&k, _)| k).unwrap_or(s);
        for (&k, seg) in self.m.range(first..e) {
            let a = k.max(s);
            let b = seg.end.min(e);
            if b > a {
                n += b - a;
            }
        }
        n
    }
    fn update(&mut self, s: u64, e: u64, f: impl Fn(Seg) -> Option<Seg>) {
        self.split_at(s);
        self.split_at(e);
        let keys: Vec<u64> = self.m.range(s..e).map(|(&k, _)| k).collect();
        for k in keys {
            let seg = self.m.remove(&k).unwrap();
            if let Some(n) = f(seg) {
                self.m.insert(k, n);
            }
        }
    }
    fn insert(&mut self, s: u64, e: u64, hva: u64, perms: Perms) {
        self.m.insert(
            s,
            Seg {
                end: e,
                hva,
                perms,
                kind: Kind::Present,
            },
        );
    }
    fn count(&self, s: u64, e: u64, kind: Kind) -> u64 {
        let first = self.m.range(..s).next_back().map(|(&k, _)| k).unwrap_or(s);
        self.m
            .range(first..e)
            .filter(|(_, seg)| seg.kind == kind)
            .map(|(&k, seg)| seg.end.min(e).saturating_sub(k.max(s)))
            .sum()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        gpa: u64,
        len: u64,
        hva_skew: bool,
        perms: Perms,
        leaf: PageSize,
    },
    Unmap {
        gpa: u64,
        len: u64,
        mode: UnmapMode,
        existing: bool,
    },
    Protect {
        gpa: u64,
        len: u64,
        perms: Perms,
    },
    Fault {
        gpa: u64,
    },
    Deflate {
        gpa: u64,
        len: u64,
    },
    /// A sub-range of an earlier successful map (resolved at run time).
    Prev {
        pick: u16,
        off: u16,
        len: u16,
        what: u8,
        mode: UnmapMode,
        perms: Perms,
    },
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    let bases = prop_oneof![Just(0u64), Just(G1 - 8 * M2), Just(G1), Just(3 * G1)];
    prop_oneof![
        6 => (bases.clone(), 0u64..(16 * M2 / K4), 1u64..64).prop_map(|(b, p, n)| (b + p * K4, n * K4)),
        3 => (bases, 0u64..16, 1u64..8).prop_map(|(b, p, n)| (b + p * M2, n * M2)),
        1 => (0u64..4).prop_map(|g| (g * G1, G1)),
    ]
}

fn perms() -> impl Strategy<Value = Perms> {
    prop_oneof![
        Just(Perms::R),
        Just(Perms::RW),
        Just(Perms::RWX),
        Just(Perms::RX)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let leaf = prop_oneof![
        Just(PageSize::Size4K),
        Just(PageSize::Size2M),
        Just(PageSize::Size1G)
    ];
    let mode = prop_oneof![
        Just(UnmapMode::Remove),
        Just(UnmapMode::Discard),
        Just(UnmapMode::Balloon),
        Just(UnmapMode::Detach)
    ];
    prop_oneof![
        4 => (range(), any::<u8>(), perms(), leaf).prop_map(|((gpa, len), s, perms, leaf)| Op::Map { gpa, len, hva_skew: s % 5 == 0, perms, leaf }),
        4 => (range(), mode, any::<bool>()).prop_map(|((gpa, len), mode, existing)| Op::Unmap { gpa, len, mode, existing }),
        1 => (range(), perms()).prop_map(|((gpa, len), perms)| Op::Protect { gpa, len, perms }),
        1 => range().prop_map(|(gpa, _)| Op::Fault { gpa }),
        1 => range().prop_map(|(gpa, len)| Op::Deflate { gpa, len }),
        6 => (any::<u16>(), any::<u16>(), any::<u16>(), 0u8..4, prop_oneof![
            Just(UnmapMode::Remove), Just(UnmapMode::Discard), Just(UnmapMode::Balloon), Just(UnmapMode::Detach)
        ], perms()).prop_map(|(pick, off, len, what, mode, perms)| Op::Prev { pick, off, len, what, mode, perms }),
    ]
}

fn check_page(t: &Stage2Table, o: &Oracle, a: u64) {
    let got = t.query(Gpa(a));
    match (o.get(a), got) {
        (None, PageState::Unmapped) => {}
        (Some((h, p, Kind::Present)), PageState::Present { hva, perms, size }) => {
            assert_eq!((hva.0, perms), (h, p), "page {a:#x}");
            // the leaf must lie inside one oracle run with contiguous backing
            let base = a & !(size.bytes() - 1);
            assert_eq!(
                o.get(base).map(|x| x.0),
                Some(h - (a - base)),
                "leaf {size} at {base:#x}"
            );
        }
        (Some((h, _, Kind::Discarded)), PageState::Discarded { hva, .. }) => assert_eq!(hva.0, h),
        (Some((h, _, Kind::Ballooned)), PageState::Ballooned { hva, .. }) => assert_eq!(hva.0, h),
        (want, got) => panic!("page {a:#x}: oracle {want:?}, table {got:?}"),
    }
}

fn apply(t: &Stage2Table, o: &mut Oracle, op: &Op) -> bool {
    let ok;
    match *op {
        Op::Prev { .. } => unreachable!("resolved before apply"),
        Op::Map {
            gpa,
            len,
            hva_skew,
            perms,
            leaf,
        } => {
            let hva = FAKE_HVA + gpa + if hva_skew { K4 } else { 0 };
            let r = t.map(Gpa(gpa), Hva(hva), len, perms, leaf);
            ok = r.is_ok();
            if o.covered(gpa, gpa + len) == 0 {
                r.unwrap();
                o.insert(gpa, gpa + len, hva, perms);
            } else {
                assert!(matches!(r, Err(MapError::AlreadyMapped(_))), "{r:?}");
            }
        }
        Op::Unmap {
            gpa,
            len,
            mode,
            existing,
        } => {
            let mut g = t.gather();
            let full = o.covered(gpa, gpa + len) == len;
            let r = if existing {
                t.unmap_existing(&mut g, Gpa(gpa), len, mode)
            } else {
                t.unmap(&mut g, Gpa(gpa), len, mode)
            };
            g.finish().unwrap();
            ok = r.is_ok() && full;
            if existing || full {
                r.unwrap();
                o.update(gpa, gpa + len, |s| match mode {
                    UnmapMode::Remove | UnmapMode::Detach => None,
                    UnmapMode::Discard if s.kind == Kind::Present => Some(Seg {
                        kind: Kind::Discarded,
                        ..s
                    }),
                    UnmapMode::Discard => Some(s),
                    UnmapMode::Balloon => Some(Seg {
                        kind: Kind::Ballooned,
                        ..s
                    }),
                });
            } else {
                assert!(matches!(r, Err(UnmapError::NotMapped(_))), "{r:?}");
            }
        }
        Op::Protect { gpa, len, perms } => {
            let mut g = t.gather();
            let r = t.protect(&mut g, Gpa(gpa), len, perms);
            g.finish().unwrap();
            ok = r.is_ok();
            if o.covered(gpa, gpa + len) == len {
                r.unwrap();
                o.update(gpa, gpa + len, |s| Some(Seg { perms, ..s }));
            } else {
                assert!(matches!(r, Err(UnmapError::NotMapped(_))), "{r:?}");
            }
        }
        Op::Fault { gpa } => {
            let before = t.query(Gpa(gpa));
            let r = t.fault_in(Gpa(gpa));
            ok = matches!(r, Ok(FaultOutcome::Restored { .. }));
            match (o.get(gpa), before) {
                (None, _) => assert_eq!(r, Err(FaultError::NotMapped(Gpa(gpa)))),
                (Some((_, _, Kind::Ballooned)), _) => {
                    assert_eq!(r, Err(FaultError::Ballooned(Gpa(gpa))))
                }
                (Some((_, _, Kind::Present)), _) => {
                    assert!(matches!(r, Ok(FaultOutcome::AlreadyPresent { .. })))
                }
                (Some((_, _, Kind::Discarded)), PageState::Discarded { size, .. }) => {
                    let Ok(FaultOutcome::Restored {
                        leaf_gpa, size: s2, ..
                    }) = r
                    else {
                        panic!("{r:?}")
                    };
                    assert_eq!(s2, size);
                    let e = leaf_gpa.0 + size.bytes();
                    assert_eq!(
                        o.count(leaf_gpa.0, e, Kind::Discarded),
                        size.bytes(),
                        "a discarded leaf is discarded as a whole"
                    );
                    o.update(leaf_gpa.0, e, |s| {
                        Some(Seg {
                            kind: Kind::Present,
                            ..s
                        })
                    });
                }
                (want, got) => panic!("fault at {gpa:#x}: oracle {want:?} table {got:?}"),
            }
        }
        Op::Deflate { gpa, len } => {
            let n = t.deflate(Gpa(gpa), len).unwrap();
            ok = n > 0;
            assert_eq!(n * K4, o.count(gpa, gpa + len, Kind::Ballooned));
            o.update(gpa, gpa + len, |s| {
                Some(if s.kind == Kind::Ballooned {
                    Seg {
                        kind: Kind::Discarded,
                        ..s
                    }
                } else {
                    s
                })
            });
        }
    }
    ok
}

/// Turn a `Prev` op into a concrete one over an earlier map.
fn resolve(op: &Op, maps: &[(u64, u64)]) -> Op {
    let Op::Prev {
        pick,
        off,
        len,
        what,
        mode,
        perms,
    } = *op
    else {
        return op.clone();
    };
    if maps.is_empty() {
        return Op::Fault { gpa: 0 };
    }
    let (g, l) = maps[pick as usize % maps.len()];
    let pages = l / K4;
    let o = off as u64 % pages;
    let n = 1 + len as u64 % (pages - o);
    let (gpa, len) = (g + o * K4, n * K4);
    match what {
        0 | 1 => Op::Unmap {
            gpa,
            len,
            mode,
            existing: false,
        },
        2 => Op::Protect { gpa, len, perms },
        _ => Op::Fault { gpa },
    }
}

fn op_range(op: &Op) -> (u64, u64) {
    match *op {
        Op::Prev { .. } => (0, K4),
        Op::Map { gpa, len, .. }
        | Op::Unmap { gpa, len, .. }
        | Op::Protect { gpa, len, .. }
        | Op::Deflate { gpa, len } => (gpa, len),
        Op::Fault { gpa } => (gpa, K4),
    }
}

fn run_case(ops: Vec<Op>, seed: u64) -> Result<(usize, u64, u64), TestCaseError> {
    let (t, log) = simulated_table(TableConfig {
        yield_entries: 97,
        ..TableConfig::default()
    });
    let mut o = Oracle::default();
    let mut rng = seed | 1;
    let mut effective = 0usize;
    let mut maps: Vec<(u64, u64)> = Vec::new();
    for op in &ops {
        let op = &resolve(op, &maps);
        let did = apply(&t, &mut o, op);
        effective += usize::from(did);
        if let (true, Op::Map { gpa, len, .. }) = (did, op) {
            maps.push((*gpa, *len));
        }
        let (s, l) = op_range(op);
        for a in [s, s + l - K4, s + l, s.saturating_sub(K4)] {
            check_page(&t, &o, a);
        }
        for _ in 0..8 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            check_page(
                &t,
                &o,
                (s.saturating_sub(M2) + rng % (l + 2 * M2)) & !(K4 - 1),
            );
        }
    }
    // every oracle run boundary, and the walker agrees with query
    let mut w = t.walker();
    for (&k, seg) in o.m.iter() {
        for a in [k, seg.end - K4, ((k + seg.end) / 2) & !(K4 - 1)] {
            check_page(&t, &o, a);
            let p = w.pin();
            let r = p.translate(Gpa(a), Access::Read);
            match (o.get(a), r) {
                (Some((h, perms, Kind::Present)), Ok(tr)) if perms.readable() => {
                    prop_assert_eq!(tr.hva.0, h)
                }
                (Some((_, perms, Kind::Present)), Err(WalkError::PermissionDenied { .. }))
                    if !perms.readable() => {}
                (Some((_, _, Kind::Discarded)), Err(WalkError::Discarded(_))) => {}
                (Some((_, _, Kind::Ballooned)), Err(WalkError::Ballooned(_))) => {}
                (None, Err(WalkError::NotMapped(_))) => {}
                (want, got) => {
                    prop_assert!(false, "walk {:#x}: oracle {:?} walk {:?}", a, want, got)
                }
            }
        }
    }
    // backing is at gpa or gpa + 4K (skewed maps)
    let releases = check_order_with(&log.lock().unwrap(), |h, len, s, e| {
        let g = h - FAKE_HVA;
        (g >= s && g + len <= e) || (g >= s + K4 && g - K4 + len <= e)
    });
    // remove everything: only the root page may remain
    let mut g = t.gather();
    t.unmap_existing(&mut g, Gpa(0), 4 * G1, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    t.rcu_barrier();
    prop_assert_eq!(t.stats().table_pages, 1);
    prop_assert_eq!(t.stats().use_after_free, 0);
    Ok((effective, t.stats().splits, releases))
}

#[test]
fn table_matches_oracle() {
    use proptest::test_runner::{Config, TestRunner};
    use std::cell::Cell;
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    let (ops_total, effective, splits) = (Cell::new(0usize), Cell::new(0usize), Cell::new(0u64));
    let releases = Cell::new(0u64);
    let strategy = (prop::collection::vec(op(), 150..250), any::<u64>());
    runner
        .run(&strategy, |(ops, seed)| {
            let n = ops.len();
            let (e, s, r) = run_case(ops, seed)?;
            ops_total.set(ops_total.get() + n);
            releases.set(releases.get() + r);
            effective.set(effective.get() + e);
            splits.set(splits.get() + s);
            Ok(())
        })
        .unwrap();
    // the sequences must have done real work, not only hit errors
    assert!(
        effective.get() * 4 >= ops_total.get(),
        "only {} of {} ops took effect",
        effective.get(),
        ops_total.get()
    );
    assert!(
        splits.get() > 10,
        "huge-leaf splits must be exercised: {}",
        splits.get()
    );
    // the order log must have had releases to check
    assert!(
        releases.get() > 100,
        "only {} releases were order-checked",
        releases.get()
    );
}
