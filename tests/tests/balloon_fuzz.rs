//! Property test: random descriptor tables, available rings and PFN arrays
//! fed to every balloon queue of one real VM. Whatever the input: no panic,
//! nothing released outside guest RAM (the table's refused-release counter
//! stays 0), the reserved low 2 MiB stays mapped, the device keeps
//! answering (a reset and a good inflate always work afterwards).

use guest_mm::{Gpa, PageState};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tests::kvm_or_skip;
use tests::virtio::{balloon_vm, pfns, Driver, Q, QSIZE};
use vmm::devices::virtio::balloon::{F_DEFLATE_ON_OOM, F_REPORTING, F_STATS_VQ};
use vmm::{Backing, PageSize, Vm};

const MIB: u64 = 1 << 20;
const AREA: u64 = 4 * MIB;
const RAM: u64 = 64 * MIB;

#[derive(Debug, Clone)]
struct Input {
    descs: Vec<(u16, u64, u32, u16, u16)>,
    heads: Vec<u16>,
    avail_bump: Option<u16>,
    pfns: Vec<u32>,
    queue: u32,
    /// Put a well-formed request for `pfns` in front (so the release path
    /// runs with random PFNs too).
    wellformed: bool,
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0..RAM + MIB,
        Just(AREA + 0x1_0000),
        (RAM - 16)..(RAM + 16),
        Just(vmm::devices::virtio::BALLOON_MMIO_BASE),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        0u32..64,
        Just(4u32),
        Just(4096u32),
        Just(2 << 20)
    ]
}

fn input() -> impl Strategy<Value = Input> {
    (
        prop::collection::vec(
            (
                prop_oneof![0u16..8, any::<u16>().prop_map(|i| i % QSIZE)],
                addr(),
                len(),
                prop_oneof![0u16..8, any::<u16>()],
                prop_oneof![0u16..8, any::<u16>()],
            ),
            0..16,
        ),
        prop::collection::vec(prop_oneof![0u16..8, any::<u16>()], 0..8),
        prop::option::weighted(0.1, any::<u16>()),
        prop::collection::vec(
            prop_oneof![1 => any::<u32>(), 4 => 0u32..((RAM >> 12) as u32 + 16)],
            0..64,
        ),
        0u32..5,
        any::<bool>(),
    )
        .prop_map(
            |(descs, heads, avail_bump, pfns, queue, wellformed)| Input {
                descs,
                heads,
                avail_bump,
                pfns,
                queue,
                wellformed,
            },
        )
}

fn role(q: u32) -> Q {
    [Q::Inflate, Q::Deflate, Q::Stats, Q::Reporting][q.min(3) as usize]
}

#[test]
fn random_descriptors_never_release_outside_ram() {
    if !kvm_or_skip("random_descriptors_never_release_outside_ram") {
        return;
    }
    let vm = balloon_vm("64M", Backing::Anon, PageSize::Size4K);
    let mut d = Driver::new(&vm, AREA);
    let all = F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;
    // A fixed seed by default, so that CI always runs the same 400 cases
    // (a random seed once produced a run whose cases barely reached the
    // release path, failing the vacuity check below); set
    // PROPTEST_RNG_SEED=<n> to explore other inputs.
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xba11_f022);
    eprintln!("balloon fuzz: seed {seed} (PROPTEST_RNG_SEED)");
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        ..Config::default()
    });
    let check = |vm: &Vm, d: &mut Driver, i: &Input| -> Result<(), TestCaseError> {
        // The driver's own pages may have been given away by the input:
        // take them back (they fault in as zeros).
        let t = vm.stage2().table();
        t.deflate(Gpa(AREA), MIB).expect("deflate the driver area");
        d.init(all);
        let at = d.buf(0);
        let bytes: Vec<u8> = i.pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        d.mem.write(at, &bytes).expect("PFN buffer");
        let r = role(i.queue);
        for &(idx, a, l, f, n) in &i.descs {
            d.desc(r, idx, a, l, f, n);
        }
        if i.wellformed && !i.pfns.is_empty() {
            let idx = QSIZE - 1;
            if r == Q::Reporting {
                let a = u64::from(i.pfns[0]) << 12;
                d.desc(r, idx, a, 2 << 20, tests::virtio::F_WRITE, 0);
            } else {
                d.desc(r, idx, at, bytes.len() as u32, 0, 0);
            }
            d.publish(r, &[idx]);
        }
        d.publish(r, &i.heads);
        if let Some(b) = i.avail_bump {
            d.set_avail_idx(r, b);
        }
        // Queue 4 does not exist: the transport must refuse it.
        d.w32(0x50, i.queue);
        prop_assert_eq!(t.stats().release_outside_bytes, 0);
        prop_assert_eq!(t.stats().use_after_free, 0);
        for a in (0..2 * MIB).step_by(4096) {
            let s = t.query(Gpa(a));
            prop_assert!(
                matches!(s, PageState::Present { .. }),
                "low page {:#x}: {:?}",
                a,
                s
            );
        }
        Ok(())
    };
    let cell = std::cell::RefCell::new(&mut d);
    let result = runner.run(&input(), |i| check(&vm, &mut cell.borrow_mut(), &i));
    if let Err(e) = result {
        panic!("{e}");
    }
    let s = d.dev().counters();
    let transport_errors = d.dev().lock().errors();
    assert!(
        s.errors + transport_errors > 100,
        "the fuzzer should hit many errors: {s:?} {transport_errors}"
    );
    assert!(
        s.pages_inflated > 0 && s.bytes_reported > 0,
        "the fuzzer should reach the release path: {s:?}"
    );
    // Still a working device.
    vm.stage2().table().deflate(Gpa(AREA), MIB).unwrap();
    assert_eq!(d.init(all), 0xf);
    let page = 50 * MIB;
    vm.stage2().table().deflate(Gpa(page), 4096).unwrap();
    let before = d.dev().counters().pages_inflated;
    d.send_pfns(Q::Inflate, &pfns(page, 4096), 1);
    assert_eq!(d.dev().counters().pages_inflated, before + 1);
    assert!(matches!(
        vm.stage2().table().query(Gpa(page)),
        PageState::Ballooned { .. }
    ));
    eprintln!(
        "fuzz: {} device errors, {} transport errors, {} pages inflated, {} deflated",
        s.errors, transport_errors, s.pages_inflated, s.pages_deflated
    );
}
