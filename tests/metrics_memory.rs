//! The Prometheus recorder must not keep histogram samples forever when nobody scrapes
//! `/metrics` (it did: `scripts/soak.py` saw the server grow by about 3 MiB a minute). A test
//! binary of its own, so that its resident memory is this test's alone.

use std::time::Duration;

use user_rpc::telemetry::metric;

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn record(samples: u64) {
    for i in 0..samples {
        metrics::histogram!(metric::REQUEST_DURATION, "method" => "BatchGetUsers", "strategy" => "t")
            .record((i % 100) as f64);
    }
}

#[test]
fn histogram_samples_are_folded_away_without_a_scrape() {
    let upkeep = Duration::from_millis(100);
    metric::install_prometheus(upkeep);
    // Warm up: the allocator's pools and the folded buckets exist after this.
    record(1_000_000);
    std::thread::sleep(upkeep * 5);
    let before = rss_kib();
    // 4 million samples are 32 MB of f64 if kept; folded in time, they reuse the same memory.
    for _ in 0..4 {
        record(1_000_000);
        std::thread::sleep(upkeep * 3);
    }
    let grew = rss_kib().saturating_sub(before);
    assert!(
        grew < 8 * 1024,
        "resident memory grew by {grew} KiB over 4 million unscraped samples"
    );
}
