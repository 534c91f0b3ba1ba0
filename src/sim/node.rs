//! The modeled node: `world / tp` replicas that decode independently on the true clock
//! ([`StepClock`]) and meet only at a switch and at the end.
//!
//! - A *round* (one [`StepSource::step`]) runs one decode step on every replica with running
//!   sequences; each replica's own clock advances by its own step time, so a replica with a light
//!   load finishes early instead of waiting for the slowest one every step (no lockstep).
//! - A switch is a barrier at the time of the slowest replica: until then the faster replicas keep
//!   decoding (steps that end by the barrier), then every replica pays the switch cost and the live
//!   sequences are re-placed.
//! - KV capacity: a replica runs sequences whose cached tokens fit its capacity
//!   ([`StepClock::kv_capacity_tokens`]). The rest wait in its queue (admitted as blocks free,
//!   paying a prefill of their tokens at the clock's prefill rate); when growth overflows, the most
//!   recently admitted sequence is preempted back to the queue front (it recomputes on return).
//! - Finishing is event-driven (a heap per replica keyed by the replica round a sequence
//!   finishes at), so a round costs O(replicas) plus the sequences that finish.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use super::clock::{StepAt, StepClock};
use super::run::TimelinePoint;
use crate::error::{Error, Result};
use crate::policy::controller::{LiveSeq, StepDone, StepSource};
use crate::policy::decide::SwitchCost;

/// What a switch really costs in a run.
#[derive(Clone, Copy, Debug)]
pub enum TrueSwitch<'a> {
    /// This project's modeled switch (fixed + weights + per-sequence KV migrate-or-recompute).
    Modeled(&'a SwitchCost),
    /// A flat cost per switch, ms (PAT's measured 5.52 s).
    Flat(f64),
}

impl TrueSwitch<'_> {
    pub fn ms(&self, from: usize, to: usize, contexts: &[usize]) -> f64 {
        match self {
            TrueSwitch::Modeled(s) => s.cost(from, to, contexts).total_ms,
            TrueSwitch::Flat(ms) if from != to => *ms,
            TrueSwitch::Flat(_) => 0.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Queued,
    Running,
    Done,
}

#[derive(Clone, Debug)]
struct Seq {
    index: usize,
    prompt: usize,
    target: usize,
    /// Tokens generated as of `base_round` of its replica.
    gen: usize,
    base_round: usize,
    replica: usize,
    state: State,
    /// Its KV is cached (a queued sequence lost it, or never had it).
    cached: bool,
    group: Option<usize>,
}

#[derive(Clone, Debug, Default)]
struct Replica {
    t_ms: f64,
    round: usize,
    batch: usize,
    /// Cached tokens of the running sequences.
    tokens: usize,
    /// (finish round, seq, base round) of running sequences; stale entries skipped.
    heap: BinaryHeap<Reverse<(usize, usize, usize)>>,
    /// Running sequences in admission order (may hold stale entries).
    running: Vec<usize>,
    queue: VecDeque<usize>,
    /// The clock's view of this replica's (tp, batch) as of its last step: a step of the same
    /// batch reuses it.
    at: Option<StepAt>,
}

/// The node (module docs). Cloning it snapshots a run.
#[derive(Clone)]
pub struct Node<'a> {
    clock: &'a dyn StepClock,
    switch: TrueSwitch<'a>,
    world: usize,
    tp: usize,
    seqs: Vec<Seq>,
    reps: Vec<Replica>,
    /// KV tokens a replica at `tp` holds (the clock's, asked once per layout).
    cap: Option<usize>,
    live: usize,
    pub rounds: usize,
    pub prefill_ms: f64,
    pub recompute_ms: f64,
    pub switch_ms: f64,
    pub preemptions: usize,
    pub timeline: Vec<TimelinePoint>,
    /// (tp, batch, mean context) of every running replica every [`VISIT_EVERY`] rounds: where
    /// the run actually was, to measure the predictor's error there.
    pub visited: Vec<(usize, usize, f64)>,
    /// Replicas wait for the slowest after every round (as one engine process stepping all its
    /// replicas does), instead of running independently.
    pub lockstep: bool,
}

/// Rounds between two samples of [`Node::visited`].
pub const VISIT_EVERY: usize = 32;

impl<'a> Node<'a> {
    /// A batch of `(prompt, response)` requests at `tp`, request `i` on replica `at[i]`, every
    /// replica prefilling what fits.
    pub fn new(
        clock: &'a dyn StepClock,
        switch: TrueSwitch<'a>,
        world: usize,
        tp: usize,
        requests: &[(usize, usize)],
        at: &[usize],
    ) -> Result<Node<'a>> {
        if tp == 0 || !world.is_multiple_of(tp) {
            return Err(Error::Invalid(format!(
                "tp {tp} does not divide world {world}"
            )));
        }
        let dp = world / tp;
        let seqs: Vec<Seq> = requests
            .iter()
            .zip(at)
            .enumerate()
            .map(|(index, (&(prompt, target), &replica))| Seq {
                index,
                prompt,
                target,
                gen: 0,
                base_round: 0,
                replica: replica.min(dp - 1),
                state: State::Queued,
                cached: false,
                group: None,
            })
            .collect();
        let mut node = Node {
            clock,
            switch,
            world,
            tp,
            live: seqs.iter().filter(|s| s.target > 0).count(),
            seqs,
            reps: vec![Replica::default(); dp],
            cap: clock.kv_capacity_tokens(tp),
            rounds: 0,
            prefill_ms: 0.0,
            recompute_ms: 0.0,
            switch_ms: 0.0,
            preemptions: 0,
            timeline: Vec::new(),
            visited: Vec::new(),
            lockstep: false,
        };
        for i in 0..node.seqs.len() {
            if node.seqs[i].target == 0 {
                node.seqs[i].state = State::Done;
            } else {
                let r = node.seqs[i].replica;
                node.reps[r].queue.push_back(i);
            }
        }
        for r in 0..dp {
            node.admit(r);
        }
        node.prefill_ms = node.now_ms();
        node.recompute_ms = 0.0;
        node.mark();
        Ok(node)
    }

    /// Tells the node each request's prompt group (what the policy may see of it).
    pub fn with_groups(mut self, groups: &[Option<usize>]) -> Self {
        for (s, &g) in self.seqs.iter_mut().zip(groups) {
            s.group = g;
        }
        self
    }

    fn generated(&self, i: usize) -> usize {
        let s = &self.seqs[i];
        match s.state {
            State::Running => s.gen + (self.reps[s.replica].round - s.base_round),
            _ => s.gen,
        }
    }

    fn context(&self, i: usize) -> usize {
        self.seqs[i].prompt + self.generated(i)
    }

    /// Admits queued sequences of replica `r` while they fit (at least one when it runs none).
    fn admit(&mut self, r: usize) {
        let cap = self.cap;
        while let Some(&i) = self.reps[r].queue.front() {
            let need = self.context(i);
            let rep = &self.reps[r];
            if rep.batch > 0 && cap.is_some_and(|c| rep.tokens + need > c) {
                break;
            }
            self.reps[r].queue.pop_front();
            if !self.seqs[i].cached {
                if let Some(rate) = self.clock.prefill_tokens_per_s(self.tp) {
                    let ms = 1e3 * need as f64 / rate;
                    self.reps[r].t_ms += ms;
                    self.recompute_ms += ms;
                }
            }
            let rep = &mut self.reps[r];
            let s = &mut self.seqs[i];
            s.state = State::Running;
            s.cached = true;
            s.base_round = rep.round;
            rep.heap
                .push(Reverse((rep.round + s.target - s.gen, i, rep.round)));
            rep.running.push(i);
            rep.batch += 1;
            rep.tokens += need;
        }
    }

    /// Preempts the newest running sequences of `r` while its KV overflows (keeping one).
    fn fit_capacity(&mut self, r: usize) {
        let Some(cap) = self.cap else {
            return;
        };
        while self.reps[r].tokens > cap && self.reps[r].batch > 1 {
            let Some(i) = self.reps[r].running.pop() else {
                break;
            };
            if self.seqs[i].state != State::Running {
                continue;
            }
            let ctx = self.context(i);
            let gen = self.generated(i);
            let s = &mut self.seqs[i];
            s.gen = gen;
            s.state = State::Queued;
            s.cached = false;
            let rep = &mut self.reps[r];
            rep.tokens -= ctx;
            rep.batch -= 1;
            rep.queue.push_front(i);
            self.preemptions += 1;
        }
    }

    /// The duration of replica `r`'s next decode step (0 when it runs nothing).
    fn next_step_ms(&mut self, r: usize) -> f64 {
        let (tp, clock) = (self.tp, self.clock);
        let rep = &mut self.reps[r];
        if rep.batch == 0 {
            return 0.0;
        }
        let at = match rep.at {
            Some(at) if at.key() == (tp, rep.batch) => at,
            _ => *rep.at.insert(clock.at(tp, rep.batch)),
        };
        clock.step_ms_at(&at, rep.tokens as f64 / rep.batch as f64)
    }

    /// One decode step of replica `r`; returns its duration.
    fn step_replica(&mut self, r: usize) -> f64 {
        let batch = self.reps[r].batch;
        if batch == 0 {
            return 0.0;
        }
        let dt = self.next_step_ms(r);
        let rep = &mut self.reps[r];
        rep.t_ms += dt;
        rep.round += 1;
        rep.tokens += batch;
        let mut finished = false;
        while let Some(&Reverse((at, i, base))) = rep.heap.peek() {
            if at > rep.round {
                break;
            }
            rep.heap.pop();
            let s = &mut self.seqs[i];
            if s.state != State::Running || s.base_round != base {
                continue;
            }
            s.state = State::Done;
            s.gen = s.target;
            rep.tokens -= s.prompt + s.target;
            rep.batch -= 1;
            self.live -= 1;
            finished = true;
        }
        self.fit_capacity(r);
        if finished {
            self.admit(r);
        }
        dt
    }

    fn mark(&mut self) {
        self.timeline.push(TimelinePoint {
            t_ms: self.now_ms(),
            step: self.rounds,
            live: self.live,
            tp: self.tp,
        });
    }

    /// Runs rounds until nothing is live.
    pub fn run_to_end(&mut self) -> Result<()> {
        while self.live > 0 {
            self.step()?;
        }
        Ok(())
    }

    /// The time the run ends, stepping each replica on its own to its end: the same time as
    /// [`Node::run_to_end`] (replicas meet only at a switch and at the end), without the
    /// round-by-round bookkeeping (timeline, visited points) that a finished search candidate
    /// does not need. In lockstep, [`Node::run_to_end`] itself.
    pub fn finish_ms(mut self) -> Result<f64> {
        if self.lockstep {
            self.run_to_end()?;
        } else {
            for r in 0..self.reps.len() {
                while self.reps[r].batch > 0 {
                    self.step_replica(r);
                }
            }
        }
        Ok(self.now_ms())
    }

    /// Live sequences' indices in request order.
    fn live_indices(&self) -> Vec<usize> {
        (0..self.seqs.len())
            .filter(|&i| self.seqs[i].state != State::Done)
            .collect()
    }

    /// True remaining tokens of each live sequence (request order).
    pub fn true_remaining(&self) -> Vec<usize> {
        self.live_indices()
            .into_iter()
            .map(|i| self.seqs[i].target - self.generated(i))
            .collect()
    }
}

impl StepSource for Node<'_> {
    type SwitchRecord = ();
    fn world(&self) -> usize {
        self.world
    }
    fn tp(&self) -> usize {
        self.tp
    }
    fn live(&self) -> Vec<LiveSeq> {
        self.live_indices()
            .into_iter()
            .map(|i| LiveSeq {
                index: self.seqs[i].index,
                replica: self.seqs[i].replica,
                context: self.context(i),
                // A queued sequence lost its KV (or never had it): a switch moves none of it.
                kv: if self.seqs[i].cached {
                    self.context(i)
                } else {
                    0
                },
                generated: self.generated(i),
                max_new_tokens: self.seqs[i].target,
                group: self.seqs[i].group,
            })
            .collect()
    }
    fn live_count(&self) -> usize {
        self.live
    }
    fn step(&mut self) -> Result<StepDone> {
        let before = (self.now_ms(), self.live);
        let running: usize = self.reps.iter().map(|r| r.batch).sum();
        if self.rounds.is_multiple_of(VISIT_EVERY) {
            for r in self.reps.iter().filter(|r| r.batch > 0) {
                self.visited
                    .push((self.tp, r.batch, r.tokens as f64 / r.batch as f64));
            }
        }
        for r in 0..self.reps.len() {
            self.step_replica(r);
        }
        self.rounds += 1;
        if self.lockstep {
            let t = self.now_ms();
            for r in &mut self.reps {
                r.t_ms = t;
            }
        }
        if self.live != before.1 {
            self.mark();
        }
        Ok(StepDone {
            ms: self.now_ms() - before.0,
            running,
            tokens_in: running,
            // A modeled step decodes; the node charges admissions' prefills to its clock apart.
            prefill_tokens: 0,
            tokens_out: running,
        })
    }
    fn switch(&mut self, to_tp: usize, placement: &[usize]) -> Result<(f64, ())> {
        if to_tp == 0 || !self.world.is_multiple_of(to_tp) {
            return Err(Error::Invalid(format!(
                "tp {to_tp} does not divide world {}",
                self.world
            )));
        }
        let live = self.live_indices();
        if placement.len() != live.len() {
            return Err(Error::Internal(format!(
                "a placement of {} sequences for {} live ones",
                placement.len(),
                live.len()
            )));
        }
        // Barrier: the faster replicas decode on until the slowest one's time.
        let barrier = self.now_ms();
        let catch_up = if self.lockstep { 0 } else { self.reps.len() };
        for r in 0..catch_up {
            while self.reps[r].batch > 0 {
                let dt = self.next_step_ms(r);
                if self.reps[r].t_ms + dt > barrier {
                    break;
                }
                self.step_replica(r);
            }
        }
        let contexts: Vec<usize> = live
            .iter()
            .filter(|&&i| self.seqs[i].state == State::Running)
            .map(|&i| self.context(i))
            .collect();
        let cost = self.switch.ms(self.tp, to_tp, &contexts);
        let start = barrier + cost;
        self.switch_ms += cost;
        // Re-place: cached sequences first (their KV moves with the switch), then the queued.
        let dp = self.world / to_tp;
        let mut order: Vec<(bool, usize, usize)> = Vec::new();
        for (&i, &r) in live.iter().zip(placement) {
            if self.seqs[i].state == State::Done {
                continue;
            }
            let gen = self.generated(i);
            let s = &mut self.seqs[i];
            s.gen = gen;
            s.replica = r.min(dp - 1);
            s.state = State::Queued;
            order.push((!s.cached, i, s.replica));
        }
        order.sort_unstable();
        self.tp = to_tp;
        self.cap = self.clock.kv_capacity_tokens(to_tp);
        self.reps = vec![
            Replica {
                t_ms: start,
                ..Replica::default()
            };
            dp
        ];
        for (_, i, r) in order {
            self.reps[r].queue.push_back(i);
        }
        for r in 0..dp {
            self.admit(r);
        }
        // Whatever did not fit lost its KV in the move: it recomputes when admitted.
        for r in 0..dp {
            for k in 0..self.reps[r].queue.len() {
                let i = self.reps[r].queue[k];
                self.seqs[i].cached = false;
            }
        }
        self.mark();
        Ok((cost, ()))
    }
    fn now_ms(&self) -> f64 {
        self.reps.iter().map(|r| r.t_ms).fold(0.0, f64::max)
    }
}
