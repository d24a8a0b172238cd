//! What a prompt's end adds to the gate's metrics ([`crate::metrics`]): its outcome in
//! `comfy_gate_prompts_finished_total`, and, when it ran somewhere, its queue wait, run and
//! end-to-end times by backend. Called from the audit's accounting, which every end passes.

use super::Scheduler;
use super::audit::{Ending, outcome_of};
use super::prompts::PromptRecord;
use crate::metrics::{BackendLabel, OutcomeLabel};

/// How `ending` of `r` counts in `comfy_gate_prompts_finished_total{outcome}` and on the
/// timeline: the audit outcome, with the gate's `max_run_time` endings apart as `timeout` (the
/// run the watchdog interrupted, or ended when the interrupt did not stop it).
pub(super) fn outcome_label(r: &PromptRecord, ending: &Ending<'_>) -> &'static str {
    match (ending, outcome_of(ending).0) {
        (Ending::Failed(_, kind), _) if *kind == "comfy_gate.MaxRunTimeExceeded" => "timeout",
        (_, "interrupted") if r.deadline_interrupt.is_some() => "timeout",
        (_, outcome) => outcome,
    }
}

impl Scheduler {
    /// The prompt-level metrics of an ending: its outcome, and (when it ran somewhere) its
    /// queue wait, run and end-to-end times by backend.
    pub(super) fn observe(
        &self,
        r: &PromptRecord,
        ending: &Ending<'_>,
        run_ms: Option<u64>,
        waited_until: i64,
        end_ms: i64,
    ) {
        let Some(metrics) = self.fleet.metrics.on() else {
            return;
        };
        // `end` took the outcome before its end cleared the run's state.
        let outcome = r.outcome.unwrap_or_else(|| outcome_label(r, ending));
        metrics
            .prompts_finished
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        // Only a prompt that ran somewhere has a wait, a run and an end to end there.
        let (Some(backend), Some(run_ms)) = (&r.owner, run_ms) else {
            return;
        };
        let label = BackendLabel {
            backend: backend.clone(),
        };
        let seconds = |ms: i64| ms.max(0) as f64 / 1000.0;
        metrics
            .queue_wait
            .get_or_create(&label)
            .observe(seconds(waited_until - r.create_time));
        metrics
            .end_to_end
            .get_or_create(&label)
            .observe(seconds(end_ms - r.create_time));
        metrics
            .run_time
            .get_or_create(&label)
            .observe(run_ms as f64 / 1000.0);
    }
}
