//! Point-to-point exchanges of a same-device group (what a live switch's programs send): every
//! message arrives whole and in order, as a copy into the receiver's buffer
//! (`DeviceComm::exchange`), read in place out of the sender's (`exchange_then`), and read in
//! place from an offer of its address (`share`, how a switch's KV goes between ranks sharing a
//! GPU); and a sender may overwrite its buffers right after the call (stream ordered) without a
//! peer seeing the new bytes.

use super::*;
use pat::backend::cuda::ops::{self, Strided};
use pat::backend::cuda::DView;

/// The values rank `from` sends to rank `to` as its `k`-th message in round `round`.
fn message(from: usize, to: usize, k: usize, round: usize) -> Vec<f32> {
    let n = 5 + 3 * from + 7 * to + 11 * k + round;
    (0..n)
        .map(|i| (from * 1000 + to * 100 + k * 10 + round) as f32 + i as f32 / 64.0)
        .collect()
}

#[test]
fn same_device_exchanges_deliver_every_message_in_order_and_in_place() {
    let _memory = sharing();
    if device_or_skip("same_device_exchange")
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none()
    {
        return;
    }
    let size = 3usize;
    on_each_member(size, |r, c| one_member(r, size, c)).unwrap_or_else(|e| panic!("{e}"));
}

/// Member `r`'s side: 6 rounds, two messages to and from every peer (sizes differ by pair,
/// message and round), in turn copied, read in place and offered; its send buffers are reused,
/// and rewritten with the next round's values right after each exchange.
fn one_member(r: usize, size: usize, c: &SameDeviceComm) -> Result<()> {
    let d = CudaDev::new(0)?;
    let peers: Vec<usize> = (0..size).filter(|&q| q != r).collect();
    let most = message(size, size, 2, 6).len();
    // Send buffers, one per (peer, k), reused by every round.
    let out: Vec<DBuf> = (0..2 * peers.len())
        .map(|_| DBuf::zeros(&d, DType::F32, most))
        .collect::<Result<_>>()?;
    for round in 0..6 {
        let mut sends = Vec::new();
        let mut recvs = Vec::new();
        let mut inbox = Vec::new();
        for (i, &q) in peers.iter().enumerate() {
            for k in 0..2 {
                let m = message(r, q, k, round);
                let v = out[2 * i + k].view().slice(0, m.len())?;
                v.write_f32(&d, &m)?;
                sends.push((q, v));
                inbox.push(DBuf::filled(
                    &d,
                    DType::F32,
                    message(q, r, k, round).len(),
                    0xFF,
                )?);
            }
        }
        for (j, b) in inbox.iter().enumerate() {
            recvs.push((peers[j / 2], b.view()));
        }
        // Each message copied out by this member's own stream from `data`, as a switch's
        // scatter or copy reads it.
        let copy_out = |into: &DBuf, data: DView<'_>| {
            let one = Strided {
                rows: 1,
                row_bytes: data.len() * 4,
                dst_stride: 0,
                src_stride: 0,
            };
            ops::strided_copy(&d, into.view(), data, one)
        };
        if round % 3 == 0 {
            c.exchange(&d, &sends, &recvs)?;
        } else if round % 3 == 2 {
            // Offers: the address and length, then who sent it and which message it is.
            let offers: Vec<(usize, Vec<u64>)> = (sends.iter().enumerate())
                .map(|(i, (q, v))| (*q, vec![v.ptr(), v.len() as u64, r as u64, (i % 2) as u64]))
                .collect();
            let expect: Vec<usize> = recvs.iter().map(|(q, _)| *q).collect();
            let mut read = |j: usize, w: &[u64]| {
                let (q, k) = (peers[j / 2], j % 2);
                if w.len() != 4 || w[2..] != [q as u64, k as u64] {
                    return Err(Error::Device(format!(
                        "offer {j}: {w:?}, expected message {k} of {q}"
                    )));
                }
                // SAFETY: the offering member keeps its buffer until this stream's reads are
                // done (`share`); the copy is enqueued before `share` returns.
                let data = unsafe { DView::from_raw(w[0], w[1] as usize, DType::F32) };
                copy_out(&inbox[j], data)
            };
            c.share(&d, &offers, &expect, &mut read)?;
        } else {
            let landed: Vec<DBuf> = (recvs.iter())
                .map(|(_, v)| DBuf::filled(&d, DType::F32, v.len(), 0xFF))
                .collect::<Result<_>>()?;
            let mut take = |j: usize, data: DView<'_>| copy_out(&landed[j], data);
            c.exchange_then(&d, &sends, &recvs, &mut take)?;
            inbox = landed;
        }
        // Overwrite what was sent before checking: a peer still reading it would see this.
        for v in &sends {
            v.1.write_f32(&d, &vec![-1.0; v.1.len()])?;
        }
        for (j, b) in inbox.iter().enumerate() {
            let (q, k) = (peers[j / 2], j % 2);
            check_bitwise(
                &format!("round {round}: message {k} from {q}"),
                &b.to_f32(&d)?,
                &message(q, r, k, round),
            )
            .map_err(Error::Device)?;
        }
    }
    Ok(())
}

/// Offers that do not match what a peer expects fail every member (none waits forever), and a
/// group whose members do not share device memory refuses to share at all.
#[test]
fn mismatched_offers_fail_every_member_and_unshared_groups_refuse() {
    let _memory = sharing();
    let Some(d) = device_or_skip("share_mismatch").unwrap_or_else(|e| panic!("{e}")) else {
        return;
    };
    let buf = DBuf::zeros(&d, DType::F32, 4).unwrap();
    let offer = vec![buf.view().ptr(), 4];
    let outcomes = std::sync::Mutex::new(Vec::new());
    let r = on_each_member(2, |r, c| {
        let dev = CudaDev::new(0)?;
        // Member 0 offers one buffer to member 1, which expects two from it.
        let (offers, expect) = match r {
            0 => (vec![(1, offer.clone())], vec![]),
            _ => (vec![], vec![0, 0]),
        };
        let res = c.share(&dev, &offers, &expect, &mut |_, _| Ok(()));
        outcomes.lock().unwrap().push((r, res.is_err()));
        res
    });
    let e = r.expect_err("a member expecting an offer never made must fail");
    assert!(e.to_string().contains("fewer messages"), "{e}");
    let outcomes = outcomes.into_inner().unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.iter().all(|&(_, failed)| failed), "{outcomes:?}");

    let refused = SoloComm.share(&d, &[], &[], &mut |_, _| Ok(()));
    assert!(!SoloComm.shares_memory() && refused.is_err());
}
