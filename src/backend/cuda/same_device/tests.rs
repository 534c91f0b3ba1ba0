//! A failed collective on a same-device group and what its members may still have queued.

use super::*;
use crate::backend::cuda::buffer::DBuf;
use crate::backend::cuda::testing::device_or_skip;

/// A member that fails in the middle of an offer exchange does not let any member return
/// (and its caller free what it offered) while a peer may still have a copy queued out of
/// it. Under the emulated driver with `PAT_EMU_DEFER=1` (stream work deferred to the next
/// synchronize, freed memory unmapped) such a copy fails the reader's synchronize.
#[test]
fn a_failed_exchange_returns_after_every_peer_stopped_reading() {
    if device_or_skip("failed_exchange_settles")
        .unwrap_or_else(|e| panic!("{e}"))
        .is_none()
    {
        return;
    }
    let n = 4096usize;
    let want: Vec<f32> = (0..n).map(|i| i as f32 / 8.0).collect();
    let comms = SameDeviceComm::group(3).unwrap();
    // Member 2 fails only once member 1's copy is queued.
    let copied = std::sync::Barrier::new(2);
    let member = |r: usize, c: &SameDeviceComm| -> Result<()> {
        let d = CudaDev::new(0)?;
        match r {
            // Offers one message to each peer, then frees it as soon as the call returns.
            0 => {
                let sent = DBuf::from_slice(&d, &want)?;
                let words = vec![sent.view().ptr(), (4 * n) as u64];
                let offers = vec![(1, words.clone()), (2, words)];
                let res = c.share(&d, &offers, &[], &mut |_, _| Ok(()));
                drop(sent);
                d.synchronize()?;
                res
            }
            // Copies member 0's message, then is slow to return.
            1 => {
                let landed = DBuf::filled(&d, DType::F32, n, 0xFF)?;
                let res = c.share(&d, &[], &[0], &mut |_, w| {
                    // SAFETY: member 0 offered 4n bytes of a live buffer; `landed` holds 4n.
                    unsafe { d.dtod(landed.view().ptr(), w[0], w[1] as usize)? };
                    copied.wait();
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    Ok(())
                });
                d.synchronize().map_err(|e| {
                    Error::Device(format!("member 1's device after the failed exchange: {e}"))
                })?;
                if landed.to_vec::<f32>(&d)? != want {
                    return Err(Error::Device(
                        "member 1's copy is not member 0's message".into(),
                    ));
                }
                res
            }
            // Fails reading its message.
            _ => c.share(&d, &[], &[0], &mut |_, _| {
                copied.wait();
                Err(Error::Device("member 2's read failed".into()))
            }),
        }
    };
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = (comms.iter().enumerate())
            .map(|(r, c)| s.spawn(move || member(r, c)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let e2 = results[2].as_ref().expect_err("member 2's read fails");
    assert!(e2.to_string().contains("member 2's read failed"), "{e2}");
    for (r, res) in results.iter().enumerate().take(2) {
        match res {
            Err(e) if e.to_string().contains(crate::parallel::PEER_FAILED) => {}
            other => panic!("member {r}: {other:?}"),
        }
    }
}
