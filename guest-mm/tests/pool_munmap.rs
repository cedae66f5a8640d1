//! Failure injection on the `munmap` of a table-page pool chunk when a
//! table is dropped (issue 13). The point is process wide
//! ([`guest_mm::fault::POOL_MUNMAP`]), hence a test binary of its own.
//!
//! A chunk that cannot be unmapped must stay accounted: listed
//! ([`guest_mm::reclaim::leaked_table_chunks`]), its pages still mapped and
//! resident as `mincore` and the process's RSS show, and unmapped by a
//! later [`guest_mm::reclaim::retry_leaked_table_chunks`].

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

use guest_mm::reclaim::{leaked_table_bytes, leaked_table_chunks, retry_leaked_table_chunks};
use guest_mm::*;

/// `Some(resident pages)` if `[addr, addr + len)` is mapped, `None` if not.
fn mapped(addr: u64, len: u64) -> Option<usize> {
    let mut v = vec![0u8; (len / 4096) as usize];
    // SAFETY: mincore only reads page-table state; `v` has a byte per page.
    let rc = unsafe { libc::mincore(addr as *mut _, len as usize, v.as_mut_ptr()) };
    if rc != 0 {
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOMEM)
        );
        return None;
    }
    Some(v.iter().filter(|&&b| b & 1 == 1).count())
}

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let line = s.lines().find(|l| l.starts_with("Rss:")).unwrap();
    line[4..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// A table with `n` leaf pages and `n` level-2 pages in use (one 4 KiB
/// page mapped per GiB).
fn table_with_pages(n: u64) -> std::sync::Arc<Stage2Table> {
    let t = Stage2Table::new(TableConfig::default()).unwrap();
    t.register_backing(BackingRegion {
        hva: Hva(0x1000_0000_0000),
        len: n << 30,
        kind: BackingKind::Simulated { hook: None },
    })
    .unwrap();
    for i in 0..n {
        // One leaf table (and one level-2 table) per GiB.
        t.map(
            Gpa(i << 30),
            Hva(0x1000_0000_0000 + (i << 30)),
            4096,
            Perms::RW,
            PageSize::Size4K,
        )
        .unwrap();
    }
    t
}

#[test]
fn a_failed_pool_munmap_is_counted_kept_and_retried() {
    let t = table_with_pages(300);
    // The leaf pages (one per GiB here) live in the table's leaf arena,
    // not in pool chunks: the arena is unmapped with the table whatever
    // the pool's fault point says.
    let pages = t.stats().table_pages - 300;
    assert!(pages > 256, "{pages}: want more than one pool chunk");
    assert_eq!(leaked_table_bytes(), 0);
    fault::POOL_MUNMAP.fail_always();
    let rss0 = rss_kb();
    drop(t);
    let injected = fault::POOL_MUNMAP.injected();
    let chunks = leaked_table_chunks();
    assert!(chunks.len() >= 2, "{chunks:?}");
    assert_eq!(
        injected,
        chunks.len() as u64 * 3,
        "every chunk tried 3 times"
    );
    let bytes: u64 = chunks.iter().map(|&(_, b)| b).sum();
    assert_eq!(leaked_table_bytes(), bytes);
    // Still mapped and resident: the table pages that were touched.
    let resident: usize = chunks
        .iter()
        .map(|&(a, b)| mapped(a, b).expect("a leaked chunk is still mapped"))
        .sum();
    assert!(resident as u64 >= pages, "{resident} < {pages}");
    assert!(
        rss_kb() + 64 + 300 * 4 >= rss0,
        "RSS fell by more than noise and the leaf arena although no chunk was unmapped"
    );
    // Still failing: nothing changes.
    assert_eq!(retry_leaked_table_chunks(), bytes);
    fault::POOL_MUNMAP.clear();
    assert_eq!(retry_leaked_table_chunks(), 0);
    assert_eq!(leaked_table_bytes(), 0);
    for &(a, b) in &chunks {
        assert_eq!(mapped(a, b), None, "chunk {a:#x} still mapped");
    }
    let rss1 = rss_kb();
    assert!(
        rss1 + resident as u64 * 4 <= rss0 + 256,
        "RSS did not fall by the chunks' pages: {rss0} -> {rss1} kB, {resident} pages"
    );
}
