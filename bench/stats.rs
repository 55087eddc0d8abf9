//! The pure parts the benchmarks share (`#[path]`-included by each bench
//! example): percentiles and the formatting of table cells. Their tests run
//! in `make test`'s `cargo test` with each example.

use std::time::Duration;

/// Median and nearest-rank 95th percentile; `None` samples (no takeover)
/// sort above every time.
pub fn median_p95(samples: &[Option<Duration>]) -> Option<(Option<Duration>, Option<Duration>)> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by_key(|s| (s.is_none(), *s));
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        match (sorted[n / 2 - 1], sorted[n / 2]) {
            (Some(a), Some(b)) => Some((a + b) / 2),
            _ => None,
        }
    };
    // Nearest rank: the ceil(0.95 n)-th smallest.
    let rank = (n * 95).div_ceil(100).max(1);
    Some((median, sorted[rank - 1]))
}

// ---------------------------------------------------------------- processes
/// Median and nearest-rank p95 of samples that all completed.
pub fn median_p95_of(samples: &[Duration]) -> Option<(Duration, Duration)> {
    let all: Vec<_> = samples.iter().copied().map(Some).collect();
    match median_p95(&all)? {
        (Some(median), Some(p95)) => Some((median, p95)),
        _ => None,
    }
}

/// A duration as a table cell: milliseconds below 10 s, seconds above.
pub fn duration_cell(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// `ours / baseline` as a table cell, e.g. "1.47×".
pub fn ratio_cell(ours: Duration, baseline: Duration) -> String {
    if baseline.is_zero() {
        return "n/a".into();
    }
    format!("{:.2}×", ours.as_secs_f64() / baseline.as_secs_f64())
}

/// Bytes as MiB with one decimal.
pub fn mib_cell(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn median_and_nearest_rank_p95() {
        let s = |v: &[u64]| v.iter().map(|&n| Some(ms(n))).collect::<Vec<_>>();
        assert_eq!(
            median_p95(&s(&[5, 1, 3, 2, 4])),
            Some((Some(ms(3)), Some(ms(5))))
        );
        assert_eq!(
            median_p95(&s(&[4, 1, 3, 2])),
            Some((Some(ms(2) + ms(1) / 2), Some(ms(4))))
        );
        let twenty: Vec<u64> = (1..=20).collect();
        assert_eq!(median_p95(&s(&twenty)).map(|(_, p)| p), Some(Some(ms(19))));
        // A trial without takeover ranks last.
        let mut with_miss = s(&[1, 2, 3]);
        with_miss.push(None);
        assert_eq!(
            median_p95(&with_miss),
            Some((Some(ms(2) + ms(1) / 2), None))
        );
        assert_eq!(median_p95(&[]), None);
    }

    #[test]
    fn completed_samples_have_a_median_and_p95() {
        assert_eq!(
            median_p95_of(&[ms(300), ms(100), ms(200)]),
            Some((ms(200), ms(300)))
        );
        assert_eq!(median_p95_of(&[]), None);
    }

    #[test]
    fn cells_read_as_a_person_writes_them() {
        assert_eq!(duration_cell(ms(277)), "277 ms");
        assert_eq!(duration_cell(ms(101_040)), "101.0 s");
        assert_eq!(ratio_cell(ms(915), ms(277)), "3.30×");
        assert_eq!(ratio_cell(ms(915), Duration::ZERO), "n/a");
        assert_eq!(mib_cell(63 * 1024 * 1024 + 512 * 1024), "63.5 MiB");
    }
}
