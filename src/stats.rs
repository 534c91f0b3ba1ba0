//! Small statistics shared by the benchmarks, the profiler, the cost model and the policy.

/// Median of timings (mean of the middle two for an even count); NaN when empty. Sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// A rate at `tp` from (tp, rate) points in any order: the point's rate, else linear interpolation
/// between the nearest degrees, clamped to the end points; `None` with no points. The one
/// interpolation of per-tp rates (prefill tokens/s) in pat.
pub fn rate_at(points: &[(usize, f64)], tp: usize) -> Option<f64> {
    let mut pts = points.to_vec();
    pts.sort_by_key(|p| p.0);
    let (first, last) = (*pts.first()?, *pts.last()?);
    if tp <= first.0 {
        return Some(first.1);
    }
    if tp >= last.0 {
        return Some(last.1);
    }
    let i = pts.iter().position(|&(t, _)| t >= tp)?;
    let ((t0, r0), (t1, r1)) = (pts[i - 1], pts[i]);
    if t1 == tp {
        return Some(r1);
    }
    Some(r0 + (r1 - r0) * (tp - t0) as f64 / (t1 - t0) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_lengths() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn rate_at_interpolates_and_clamps() {
        let pts = [(8, 6000.0), (1, 1000.0), (2, 1800.0)];
        // tp 4 between (2, 1800) and (8, 6000): 1800 + 4200 * 2/6.
        assert!((rate_at(&pts, 4).unwrap() - 3200.0).abs() < 1e-9);
        assert_eq!(rate_at(&pts, 2), Some(1800.0));
        assert_eq!(rate_at(&pts, 16), Some(6000.0));
        assert_eq!(rate_at(&pts, 0), Some(1000.0));
        assert_eq!(rate_at(&[], 2), None);
    }
}
