//! Percentiles of duration samples.

use std::time::Duration;

/// Median, p90 and p99 of a set of samples, in microseconds.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub samples: usize,
    pub median_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

/// The nearest-rank percentile `p` (0..=100) of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut s = samples.to_vec();
    s.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Summary {
        samples: s.len(),
        median_us: us(percentile(&s, 50.0)),
        p90_us: us(percentile(&s, 90.0)),
        p99_us: us(percentile(&s, 99.0)),
        min_us: us(s.first().copied().unwrap_or_default()),
        max_us: us(s.last().copied().unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<Duration> = (1..=10).map(Duration::from_micros).collect();
        let s = summarize(&v);
        assert_eq!(s.median_us, 5.0);
        assert_eq!(s.p90_us, 9.0);
        assert_eq!(s.p99_us, 10.0);
        assert_eq!(summarize(&[]).samples, 0);
    }
}
