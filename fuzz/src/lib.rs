//! Checks shared by the fuzz targets: invariants of parsed values, and independent executors of
//! the weight and KV reshard programs over labelled rows, compared with what the shard rules say
//! each rank must hold afterwards. A violated invariant panics (libFuzzer reports it as a crash).

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use pat::model::config::ModelConfig;
use pat::model::weights::Checkpoint;
use pat::parallel::shard::{self, Role, Source};
use pat::parallel::Layout;
use pat::reshard::kv::{KvPlan, KvProgram, KvStep};
use pat::reshard::weights::{self, Op, Step, WeightPlan, WeightProgram};

/// Invariants of a parsed config, and its derived values computed without a panic.
pub fn check_config(c: &ModelConfig) {
    assert!(c.vocab_size >= 1 && c.hidden_size >= 1 && c.num_layers >= 1);
    assert!(c.num_heads >= 1 && c.num_kv_heads >= 1 && c.head_dim >= 2);
    assert_eq!(c.num_heads % c.num_kv_heads, 0);
    assert_eq!(c.head_dim % 2, 0);
    assert!(c.eos_token_ids.iter().all(|&t| (t as usize) < c.vocab_size));
    let f = c.inv_freq();
    assert_eq!(f.len(), c.head_dim / 2);
    let _ = c.kv_bytes_per_token(4);
    let _ = shard::weight_bytes_per_rank(c, 1, 4);
}

/// A small valid llama config (vocab 64, 8 heads over 2 kv heads, 512 positions).
pub fn small_config() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":64,"hidden_size":32,
            "intermediate_size":48,"num_hidden_layers":2,"num_attention_heads":8,
            "num_key_value_heads":2,"max_position_embeddings":512}"#,
        Path::new("config.json"),
    )
    .expect("small config")
}

/// Opens the checkpoint in `dir`; on success reads every tensor whole and, for 2-D ones, by rows,
/// checking element counts against the header's shape.
pub fn open_and_read_all(dir: &Path) {
    let Ok(ck) = Checkpoint::open(dir) else {
        return;
    };
    let tensors: Vec<(String, Vec<usize>)> = ck
        .tensors()
        .map(|(n, i)| (n.to_string(), i.shape.clone()))
        .collect();
    for (name, shape) in tensors {
        let elems: usize = shape.iter().product();
        let Ok(all) = ck.read(&name, &shape) else {
            continue;
        };
        assert_eq!(all.len(), elems, "{name} {shape:?}");
        if let [rows, cols] = shape[..] {
            if rows > 1 {
                let part = ck.read_rows(&name, &shape, 1..rows).expect("rows in range");
                assert_eq!(part.len(), (rows - 1) * cols);
                assert_eq!(&part[..], &all[cols..]);
            }
            if cols > 0 {
                let t = ck
                    .read_cols_transposed(&name, &[rows, cols], 0..1)
                    .expect("column in range");
                assert_eq!(t.len(), rows);
            }
            assert!(ck.read_rows(&name, &shape, 0..rows + 1).is_err());
        }
    }
}

/// What one row of a rank's weight buffer holds: a row of a checkpoint tensor, or padding.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Label {
    Row(String, usize),
    Zero,
}

fn labels(cfg: &ModelConfig, role: Role, tp: usize, r: usize) -> Vec<Label> {
    let mut v = Vec::new();
    for s in shard::segments(cfg, role, 0, tp, r) {
        for row in s.rows {
            v.push(match &s.source {
                Source::Tensor { name, .. } => Label::Row(name.clone(), row),
                Source::Zeros => Label::Zero,
            });
        }
    }
    v
}

/// The plan's own invariants: every rank's ops sorted by destination, tiling [0, new_rows) once,
/// copies inside the source's old buffer; byte counts add up and reach the minimum.
pub fn check_weight_plan(cfg: &ModelConfig, plan: &WeightPlan) {
    let world = plan.new.world;
    for ro in &plan.ops {
        assert_eq!(ro.ranks.len(), world);
        for (p, rk) in ro.ranks.iter().enumerate() {
            assert_eq!(rk.rank, p);
            assert_eq!(rk.new_rows, shard::rows(cfg, ro.role, plan.new.tp));
            let mut at = 0;
            for op in &rk.ops {
                assert_eq!(op.dst_row(), at, "{:?} rank {p}: ops must tile", ro.role);
                at += op.rows();
                if let Op::Copy {
                    src_rank,
                    src_row,
                    rows,
                    ..
                } = *op
                {
                    assert!(src_rank < world);
                    assert!(src_row + rows <= ro.ranks[src_rank].old_rows);
                }
            }
            assert_eq!(at, rk.new_rows);
        }
    }
    let sum = |f: fn(&weights::RoleOps) -> u64| plan.ops.iter().map(f).sum::<u64>();
    assert_eq!(plan.bytes_cross_rank, sum(|r| r.bytes_cross_rank));
    assert_eq!(plan.bytes_in_place, sum(|r| r.bytes_in_place));
    let min = weights::min_cross_rank_bytes(cfg, &plan.old, &plan.new, plan.elem_bytes);
    assert!(plan.bytes_cross_rank >= min);
}

/// Executes the per-rank weight programs over labelled rows (FIFO channels per role and rank pair,
/// in-place compaction where a program says so) and checks every rank ends up with exactly the
/// rows the shard rules give its new (replica, tp-rank), and that messages and bytes balance.
pub fn check_weight_programs(cfg: &ModelConfig, plan: &WeightPlan, progs: &[WeightProgram]) {
    let (old, new) = (&plan.old, &plan.new);
    let world = old.world;
    assert_eq!(progs.len(), world);
    let sent: u64 = progs.iter().map(|p| p.bytes_sent).sum();
    let recv: u64 = progs.iter().map(|p| p.bytes_received).sum();
    assert_eq!(sent, recv);
    assert_eq!(sent, plan.bytes_cross_rank);
    for (ri, ro) in plan.ops.iter().enumerate() {
        let olds: Vec<Vec<Label>> = (0..world)
            .map(|p| labels(cfg, ro.role, old.tp, old.position(p).1))
            .collect();
        // Phase 1: every rank's sends, into (from, to) FIFO channels.
        let mut chan: HashMap<(usize, usize), VecDeque<Vec<Label>>> = HashMap::new();
        for (me, prog) in progs.iter().enumerate() {
            let rp = &prog.roles[ri];
            assert_eq!(rp.role, ro.role);
            assert_eq!(rp.old_rows, olds[me].len());
            for st in &rp.steps {
                if let Step::Send { to, src_row, rows } = *st {
                    assert_ne!(to, me);
                    let msg = olds[me][src_row..src_row + rows].to_vec();
                    chan.entry((me, to)).or_default().push_back(msg);
                }
            }
        }
        // Phase 2: moves (in place when the program says so), receives and zeros.
        for (me, prog) in progs.iter().enumerate() {
            let rp = &prog.roles[ri];
            let mut buf: Vec<Option<Label>> = olds[me].iter().cloned().map(Some).collect();
            let mut fresh: Vec<Option<Label>> = vec![None; rp.new_rows];
            let mut written = vec![0u32; rp.new_rows];
            let mut last_dst = None;
            for st in &rp.steps {
                if let Step::Move {
                    src_row,
                    dst_row,
                    rows,
                } = *st
                {
                    written[dst_row..dst_row + rows]
                        .iter_mut()
                        .for_each(|w| *w += 1);
                    if rp.in_place {
                        assert!(dst_row <= src_row, "in-place move goes up");
                        assert!(last_dst.is_none_or(|d| d <= dst_row));
                        last_dst = Some(dst_row);
                        // Forward, row by row: what a compaction that moves rows down does.
                        for i in 0..rows {
                            buf[dst_row + i] = buf[src_row + i].clone();
                        }
                    } else {
                        fresh[dst_row..dst_row + rows]
                            .clone_from_slice(&buf[src_row..src_row + rows]);
                    }
                }
            }
            if rp.in_place {
                assert!(rp.new_rows <= rp.old_rows);
                buf.truncate(rp.new_rows);
                fresh = buf;
            }
            for st in &rp.steps {
                match *st {
                    Step::Recv {
                        from,
                        dst_row,
                        rows,
                    } => {
                        let msg = chan
                            .get_mut(&(from, me))
                            .and_then(|q| q.pop_front())
                            .expect("a receive without its send");
                        assert_eq!(msg.len(), rows, "message size");
                        for (i, l) in msg.into_iter().enumerate() {
                            fresh[dst_row + i] = Some(l);
                            written[dst_row + i] += 1;
                        }
                    }
                    Step::Zero { dst_row, rows } => {
                        for i in dst_row..dst_row + rows {
                            fresh[i] = Some(Label::Zero);
                            written[i] += 1;
                        }
                    }
                    _ => {}
                }
            }
            assert!(
                written.iter().all(|&w| w == 1),
                "rank {me} {:?}: rows written {written:?}",
                ro.role
            );
            let want = labels(cfg, ro.role, new.tp, new.position(me).1);
            let got: Vec<Label> = fresh.into_iter().map(|l| l.expect("row")).collect();
            assert_eq!(got, want, "rank {me} {:?}", ro.role);
        }
        assert!(
            chan.values().all(|q| q.is_empty()),
            "a send without its receive"
        );
    }
}

/// Where global kv head `h` of `replica` lives in `l`: (physical rank, local head), from the
/// layout's placement and the contiguous head split (independent of `kv::head_home`).
fn home(l: &Layout, kv: usize, replica: usize, h: usize) -> (usize, usize) {
    let per = kv / l.tp;
    (l.replica_ranks(replica)[h / per], h % per)
}

/// The KV plan's invariants, and its per-rank programs executed over labelled head slices.
pub fn check_kv(cfg: &ModelConfig, plan: &KvPlan, progs: &[KvProgram]) {
    let kv = cfg.num_kv_heads;
    let live = plan.seqs.iter().filter(|s| s.len > 0).count();
    assert_eq!(plan.pieces.len(), live * kv);
    let total: u64 = plan.pieces.iter().map(|p| p.bytes).sum();
    assert_eq!(total, plan.bytes_cross_rank + plan.bytes_in_place);
    // Old pools: rank -> (seq, local head) -> (seq, global head).
    let world = plan.old.world;
    let mut old: Vec<HashMap<(usize, usize), (usize, usize)>> = vec![HashMap::new(); world];
    let mut want: Vec<HashMap<(usize, usize), (usize, usize)>> = vec![HashMap::new(); world];
    for (i, s) in plan.seqs.iter().enumerate() {
        if s.len == 0 {
            continue;
        }
        for h in 0..kv {
            let (r, lh) = home(&plan.old, kv, s.old_replica, h);
            old[r].insert((i, lh), (i, h));
            let (r, lh) = home(&plan.new, kv, s.new_replica, h);
            want[r].insert((i, lh), (i, h));
        }
    }
    assert_eq!(progs.len(), world);
    let mut chan: HashMap<(usize, usize), VecDeque<(usize, (usize, usize))>> = HashMap::new();
    for (me, prog) in progs.iter().enumerate() {
        assert_eq!(prog.rank, me);
        for st in &prog.steps {
            if let KvStep::Send { to, seq, src_head } = *st {
                let l = *old[me]
                    .get(&(seq, src_head))
                    .expect("send of a head the rank lacks");
                chan.entry((me, to)).or_default().push_back((seq, l));
            }
        }
    }
    let mut got: Vec<HashMap<(usize, usize), (usize, usize)>> = vec![HashMap::new(); world];
    for (me, prog) in progs.iter().enumerate() {
        for st in &prog.steps {
            let (seq, dst_head, l) = match *st {
                KvStep::Send { .. } => continue,
                KvStep::Local {
                    seq,
                    src_head,
                    dst_head,
                } => (
                    seq,
                    dst_head,
                    *old[me].get(&(seq, src_head)).expect("local head"),
                ),
                KvStep::Recv {
                    from,
                    seq,
                    dst_head,
                } => {
                    let (s, l) = chan
                        .get_mut(&(from, me))
                        .and_then(|q| q.pop_front())
                        .expect("a receive without its send");
                    assert_eq!(s, seq, "messages out of order");
                    (seq, dst_head, l)
                }
            };
            assert!(
                got[me].insert((seq, dst_head), l).is_none(),
                "a head written twice"
            );
        }
    }
    assert!(
        chan.values().all(|q| q.is_empty()),
        "a send without its receive"
    );
    assert_eq!(got, want);
}
