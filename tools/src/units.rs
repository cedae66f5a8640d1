//! Parsing of command-line quantities: byte sizes (`64M`, `1G`, `4GiB`),
//! size lists (`1G,4G`), leaf sizes (`4K`, `2M`) and durations in seconds.
//!
//! Every parser returns a message that says what was wrong and what is
//! accepted, so clap can print it and exit non-zero.

use guest_mm::PageSize;

/// Parse a byte size: a positive integer with an optional binary suffix
/// `K`, `M`, `G`, `T` (optionally followed by `iB` or `B`). Zero, overflow
/// and anything else are refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let body = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (digits, shift) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 10),
        Some('M') => (&body[..body.len() - 1], 20),
        Some('G') => (&body[..body.len() - 1], 30),
        Some('T') => (&body[..body.len() - 1], 40),
        _ => (body, 0),
    };
    let bad = || {
        format!("invalid size {t:?}: expected a positive number with an optional K/M/G/T suffix, e.g. 256M, 1G, 4G")
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(format!(
            "invalid size {t:?}: the size must be greater than zero"
        ));
    }
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {t:?}: too large"))
}

/// A comma-separated list of sizes, as one argument value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeList(pub Vec<u64>);

/// Parse a comma-separated list of sizes (`1G,4G`).
pub fn parse_size_list(s: &str) -> Result<SizeList, String> {
    let v = s
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(parse_size)
        .collect::<Result<Vec<_>, _>>()?;
    if v.is_empty() {
        return Err(format!(
            "invalid size list {s:?}: give at least one size, e.g. 1G,4G"
        ));
    }
    Ok(SizeList(v))
}

/// Parse a leaf size for the benchmarks: `4K` or `2M`.
pub fn parse_leaf(s: &str) -> Result<PageSize, String> {
    match PageSize::parse(s) {
        Some(p @ (PageSize::Size4K | PageSize::Size2M)) => Ok(p),
        _ => Err(format!("invalid page size {s:?}: expected 4K or 2M")),
    }
}

/// Parse a duration in seconds (fractions allowed), greater than zero and
/// at most a day.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected seconds, e.g. 2 or 0.5"))?;
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        return Err(format!(
            "invalid duration {s:?}: must be more than 0 and at most 86400 seconds"
        ));
    }
    Ok(v)
}

/// Human form of a byte count (`1 GiB`, `64 MiB`, `12.5 KiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2KB"), Ok(2048));
        assert!(parse_size("0").is_err());
        assert!(parse_size("0G").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(
            parse_size_list("1G,4G"),
            Ok(SizeList(vec![1 << 30, 4 << 30]))
        );
        assert!(parse_size_list(",").is_err());
    }

    #[test]
    fn leaves_and_seconds() {
        assert_eq!(parse_leaf("4K"), Ok(PageSize::Size4K));
        assert_eq!(parse_leaf("2m"), Ok(PageSize::Size2M));
        assert!(parse_leaf("1G").is_err());
        assert!(parse_leaf("3K").is_err());
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("x").is_err());
        assert_eq!(human_bytes(1 << 30), "1 GiB");
    }
}
