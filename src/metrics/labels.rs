//! The label sets of the gate's metrics: small structs, so a family can only be given the
//! labels it was declared with, and each value's bound is said where it is declared.

use prometheus_client::encoding::EncodeLabelSet;

/// `{route, code}`: the route class (see `edge::route_class`, a fixed set) and the status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub code: u16,
}

/// `{backend}`: a configured backend name (bounded by the config).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

/// `{band}`: a configured priority band (`auth.bands`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BandLabel {
    pub band: String,
}

/// `{outcome}`: success, error, interrupted, failed, timeout, deleted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// `{reason}`: a fixed word, one of `metrics::REQUEUE_REASONS`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `{class}`: a node class, capped (see `Metrics::class_label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: String,
}

/// `{limit}`: which limit refused (rate, concurrency, queue, body …; a fixed word).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

/// `{backend, reason}`: the chosen backend and the decision's kind (the placement policy's
/// fixed word for why it won, e.g. `sooner`, `resident_checkpoint`, `only_candidate`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlacementLabels {
    pub backend: String,
    pub reason: &'static str,
}
