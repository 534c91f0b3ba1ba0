//! Point-to-point exchanges of a same-device group (what a live switch's programs send): every
//! message arrives whole and in order, both as a copy into the receiver's buffer
//! (`DeviceComm::exchange`) and read in place out of the sender's (`exchange_then`), and a
//! sender may overwrite its buffers right after the call (stream ordered) without a peer seeing
//! the new bytes.

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
    if device_or_skip("same_device_exchange")
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none()
    {
        return;
    }
    let size = 3usize;
    on_each_member(size, |r, c| one_member(r, size, c)).unwrap_or_else(|e| panic!("{e}"));
}

/// Member `r`'s side: 4 rounds, two messages to and from every peer (sizes differ by pair,
/// message and round), alternately copied and read in place; its send buffers are reused, and
/// rewritten with the next round's values right after each exchange.
fn one_member(r: usize, size: usize, c: &SameDeviceComm) -> Result<()> {
    let d = CudaDev::new(0)?;
    let peers: Vec<usize> = (0..size).filter(|&q| q != r).collect();
    let most = message(size, size, 2, 4).len();
    // Send buffers, one per (peer, k), reused by every round.
    let out: Vec<DBuf> = (0..2 * peers.len())
        .map(|_| DBuf::zeros(&d, DType::F32, most))
        .collect::<Result<_>>()?;
    for round in 0..4 {
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
        if round % 2 == 0 {
            c.exchange(&d, &sends, &recvs)?;
        } else {
            // In place: each message copied out by this member's own stream, as a switch's
            // scatter reads it.
            let landed: Vec<DBuf> = (recvs.iter())
                .map(|(_, v)| DBuf::filled(&d, DType::F32, v.len(), 0xFF))
                .collect::<Result<_>>()?;
            let mut take = |j: usize, data: DView<'_>| {
                let row_bytes = data.len() * 4;
                let one = Strided {
                    rows: 1,
                    row_bytes,
                    dst_stride: 0,
                    src_stride: 0,
                };
                ops::strided_copy(&d, landed[j].view(), data, one)
            };
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
