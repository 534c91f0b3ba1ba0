//! The simulator's truth and what the policy sees: the predictor fitted to a profile sampled from
//! the component model, held out against the model itself; the node's accounting by hand.

use pat::policy::modeled::{Link, ModelShape};
use pat::policy::predictor::{validate_form, FitForm};
use pat::sim::{sampled_profile, ComponentModel, ComponentParams, GpuKind};

fn model(shape: ModelShape, per_seq_us: f64, link: Link) -> ComponentModel {
    let mut p = ComponentParams::defaults(GpuKind::H100, link);
    p.host_per_seq_us = per_seq_us;
    ComponentModel::new(shape.dims(), p).unwrap()
}

#[test]
fn host_max_predictor_holds_out_within_3_percent_on_modeled_profiles() {
    for shape in [ModelShape::Llama3_8b, ModelShape::Qwen3_14b] {
        for per_seq in [0.0, 20.0, 80.0] {
            for link in [Link::NvLink, Link::Pcie] {
                let prof = sampled_profile(&model(shape, per_seq, link), 8).unwrap();
                for seed in 0..3 {
                    let hm = validate_form(&prof, 0.2, seed, FitForm::HostMax).unwrap();
                    let lin = validate_form(&prof, 0.2, seed, FitForm::Abc).unwrap();
                    eprintln!(
                        "{shape} {per_seq} us {link:?} seed {seed}: host-max {:.2}% (worst tp {:.2}%), linear {:.2}%",
                        hm.overall_mape,
                        hm.mape_per_tp.values().fold(0.0f64, |a, &b| a.max(b)),
                        lin.overall_mape
                    );
                    assert!(hm.overall_mape <= 3.0, "{shape} {per_seq} {link:?}: {hm:?}");
                }
            }
        }
    }
}
