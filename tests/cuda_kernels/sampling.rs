//! Argmax and the fixed-point sampler.

use super::*;

#[test]
fn argmax_handles_ties_nan_and_padding() {
    let d = gpu!("argmax");
    let mut r = rng("argmax");
    let (vocab, stride, rows) = (1001usize, 1008usize, 6usize);
    for dt in FLOATS {
        let mut v = rand_vec(&mut r, rows * stride, 3.0);
        let row = |i: usize| i * stride..i * stride + vocab;
        v[row(1).start + 10] = 7.5;
        v[row(1).start + 500] = 7.5;
        for i in (0..vocab).step_by(13) {
            v[row(2).start + i] = f32::NAN;
        }
        v[row(3)].fill(f32::NEG_INFINITY);
        v[row(4)].fill(f32::NAN);
        v[row(5).start + vocab - 1] = 9.0;
        for i in 0..rows {
            v[i * stride + vocab..(i + 1) * stride].fill(100.0); // padding must be ignored
        }
        let (lb, lv) = up(&d, &v, dt);
        let idx = DBuf::filled(&d, DType::U32, rows, 0xFF).unwrap();
        let val = poisoned(&d, DType::F32, rows);
        let rs = Rows {
            n_rows: rows,
            vocab,
            row_stride: stride,
        };
        ops::argmax(&d, lb.view(), idx.view(), Some(val.view()), rs, 1000).unwrap();
        let (gi, gv) = (idx.to_vec::<u32>(&d).unwrap(), host(&d, &val));
        for i in 0..rows {
            let (wi, wv) = host_argmax(&lv[row(i)]);
            assert_eq!(gi[i], wi + 1000, "argmax {dt:?} row {i}");
            assert_eq!(gv[i].to_bits(), wv.to_bits(), "argmax value {dt:?} row {i}");
        }
    }
}

#[test]
fn sample_follows_the_filtered_distribution() {
    let d = gpu!("sample");
    let mut r = rng("sample");
    let (vocab, n) = (50usize, 8192usize);
    let uni: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
    let ub = DBuf::from_slice(&d, &uni).unwrap();
    for dt in FLOATS {
        let mut x = rand_vec(&mut r, vocab, 3.0);
        let top = host_argmax(&x).0 as usize;
        x[top] += 0.5; // a unique maximum, so greedy cuts keep exactly one token
        let x = round_to(&x, dt);
        let (lb, _) = up(&d, &x.repeat(n), dt);
        let rs = Rows {
            n_rows: n,
            vocab,
            row_stride: vocab,
        };
        let am = host_argmax(&x).0;
        let cfg = |temperature, top_k, top_p| SampleCfg {
            temperature,
            top_k,
            top_p,
        };
        for c in [
            cfg(1.0, 0, 1.0),
            cfg(0.7, 10, 1.0),
            cfg(1.3, 0, 0.8),
            cfg(1.0, 5, 0.5),
        ] {
            let out = DBuf::filled(&d, DType::U32, n, 0xFF).unwrap();
            ops::sample(&d, lb.view(), out.view(), ub.view(), rs, c).unwrap();
            let mut count = vec![0usize; vocab];
            for i in out.to_vec::<u32>(&d).unwrap() {
                count[i as usize] += 1;
            }
            for (j, p) in host_sample_probs(&x, c.temperature, c.top_k, c.top_p)
                .iter()
                .enumerate()
            {
                let exp = p * n as f64;
                assert!(
                    (count[j] as f64 - exp).abs() <= 3.0,
                    "sample {dt:?} {c:?}: token {j} drawn {} times, expected {exp:.1}",
                    count[j]
                );
            }
        }
        for c in [cfg(0.0, 0, 1.0), cfg(1.0, 1, 1.0), cfg(1.0, 0, 1e-6)] {
            let out = DBuf::filled(&d, DType::U32, n, 0xFF).unwrap();
            ops::sample(&d, lb.view(), out.view(), ub.view(), rs, c).unwrap();
            assert!(
                out.to_vec::<u32>(&d).unwrap().iter().all(|&i| i == am),
                "sample {dt:?} {c:?} is not greedy"
            );
        }
    }
}
