//! Profile JSON -> `Profile::from_json`, then the predictor and cost model built from it: a clean
//! error, or values that are finite where the profile promises it.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pat::policy::predictor::Predictor;
use pat::policy::profile::Profile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Profile::from_json(text, Path::new("p.json")) else {
        return;
    };
    assert!(p.world >= 1 && !p.decode.is_empty());
    let tps = p.decode_tps();
    assert!(tps.iter().all(|t| p.world % t == 0));
    let cost = p.cost_model();
    assert!(
        cost.validate().is_ok(),
        "a valid profile gives a valid cost model"
    );
    for &tp in &tps {
        if let Some(r) = p.prefill_rate(tp) {
            assert!(r.is_finite() && r > 0.0, "prefill rate at tp {tp}: {r}");
        }
    }
    let back = Profile::from_json(&p.to_json(), Path::new("p.json")).expect("round trip");
    assert_eq!(back.decode, p.decode);
    if let Ok(pred) = Predictor::from_profile(&p) {
        for &tp in &tps {
            if let Ok(ms) = pred.step_ms(tp, 1, 16.0) {
                assert!(ms.is_finite(), "step_ms at tp {tp}: {ms}");
            }
        }
    }
});
