//! A prompt's timeline (issue 15): what happened to it, when, as the gate saw it. Submitted,
//! dispatched (where and why), started, each node's start and end, the nodes ComfyUI answered
//! from its cache, previews, moved back to the queue (why), finished (how).
//!
//! Why a list of marks and not a table of fields: a prompt may run more than once (its backend
//! died, it ran out of memory), and the operator asking "why was this slow?" needs every
//! attempt. [`Timeline::view`] groups the marks into attempts for `GET
//! /admin/prompts/{id}/timeline` and the dashboard's waterfall.
//!
//! The timeline lives on the prompt's record, so it is persisted with the record and, at the
//! end, in the same store transaction as the prompt's history entry; a restart keeps it for as
//! long as the entry is kept. Node marks come only from the `executing` transitions the gate
//! relays anyway (ComfyUI's only per-node timing on the wire: a node ends when the next one
//! starts, the last when `executing {node: null}` arrives). A timeline holds at most
//! [`MAX_MARKS`] node, cache and preview marks (later ones are counted, not kept); the marks of
//! its life (dispatched, started, ran, requeued, finished) have [`LIFE_ROOM`] more, so a graph
//! with thousands of nodes still shows how each attempt and the prompt ended.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The most node, cache and preview marks one timeline keeps (a graph of a few hundred nodes
/// run twice fits; about 100 bytes each).
pub const MAX_MARKS: usize = 1024;
/// Room past [`MAX_MARKS`] for the marks of a prompt's life.
pub const LIFE_ROOM: usize = 64;

/// What happened (a mark's `kind`, with what it needs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Happened {
    /// Accepted by `POST /prompt`.
    Submitted,
    /// Sent to `backend` by the placement policy; `reason` is its explanation.
    Dispatched { backend: String, reason: String },
    /// `execution_start` from its backend.
    Started { backend: String },
    /// `executing {node}`: this node began (the previous one ended).
    Node { node: String, class: String },
    /// `execution_cached`: these nodes were answered from ComfyUI's cache; `classes` are their
    /// classes, in the same order (empty in marks written before they were kept).
    Cached {
        nodes: Vec<String>,
        #[serde(default)]
        classes: Vec<String>,
    },
    /// Previews received while `node` ran (a run of previews is one mark, its `count` grows).
    Previews { node: Option<String>, count: u32 },
    /// `executing {node: null}`: the run on its backend ended.
    Ran,
    /// Back to the gate queue (its backend failed, drained, retired, ran out of memory).
    Requeued { reason: String },
    /// It ended: `outcome` as in `comfy_gate_prompts_finished_total`.
    Finished { outcome: String },
}

/// One mark: when (ms since the Unix epoch) and what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub at: i64,
    #[serde(flatten)]
    pub what: Happened,
}

/// A prompt's marks, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub marks: Vec<Mark>,
    /// Marks not kept past [`MAX_MARKS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u32,
    /// Keeps nothing (`[metrics] timelines = false` when it was submitted; kept in the store
    /// so a restart does not start one half way).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    off: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Timeline {
    /// A timeline that keeps nothing (`[metrics] timelines = false`).
    pub fn off() -> Self {
        Self {
            off: true,
            ..Self::default()
        }
    }

    /// Adds a mark at `at` (ms).
    pub fn mark(&mut self, at: i64, what: Happened) {
        if self.off {
            return;
        }
        let room = match what {
            Happened::Node { .. } | Happened::Cached { .. } | Happened::Previews { .. } => {
                MAX_MARKS
            }
            // A prompt ends once: how is always kept.
            Happened::Finished { .. } => usize::MAX,
            _ => MAX_MARKS + LIFE_ROOM,
        };
        if self.marks.len() >= room {
            self.dropped += 1;
            return;
        }
        self.marks.push(Mark { at, what });
    }

    /// Counts a preview: the last mark grows if it is the same node's previews.
    pub fn preview(&mut self, at: i64, node: Option<&str>) {
        if self.off {
            return;
        }
        if let Some(Mark {
            what: Happened::Previews { node: n, count },
            ..
        }) = self.marks.last_mut()
            && n.as_deref() == node
        {
            *count += 1;
            return;
        }
        self.mark(
            at,
            Happened::Previews {
                node: node.map(str::to_string),
                count: 1,
            },
        );
    }

    /// The timeline as `GET /admin/prompts/{id}/timeline` serves it: the raw `marks`, and the
    /// same grouped into `attempts`, each
    /// `{attempt, backend, reason, dispatched_at, started_at, ended_at, end, nodes: [{node,
    /// class, start, end, cached, previews}]}` (times in ms since the epoch; `end` is `ran`,
    /// `requeued: WHY` or the outcome; `null` while it runs). `submitted_at`, `finished_at` and
    /// `outcome` are the prompt's.
    pub fn view(&self) -> Value {
        let mut attempts: Vec<Value> = Vec::new();
        let (mut submitted_at, mut finished_at, mut outcome) = (None, None, None);
        // The attempt being built, and the index of its running node.
        let mut open: Option<(Value, Option<usize>)> = None;
        let close_node = |a: &mut Value, running: &mut Option<usize>, at: i64| {
            if let Some(i) = running.take() {
                a["nodes"][i]["end"] = json!(at);
            }
        };
        for Mark { at, what } in &self.marks {
            let at = *at;
            match what {
                Happened::Submitted => submitted_at = Some(at),
                Happened::Dispatched { backend, reason } => {
                    // Sent again without a requeue mark (a timeline from before they were
                    // kept): the earlier attempt ended here.
                    if let Some((mut a, mut running)) = open.take() {
                        close_node(&mut a, &mut running, at);
                        if a["ended_at"].is_null() {
                            a["ended_at"] = json!(at);
                        }
                        if a["end"].is_null() {
                            a["end"] = json!("requeued");
                        }
                        attempts.push(a);
                    }
                    let attempt = json!({
                        "attempt": attempts.len() + 1, "backend": backend, "reason": reason,
                        "dispatched_at": at, "started_at": null, "ended_at": null, "end": null,
                        "nodes": [],
                    });
                    open = Some((attempt, None));
                }
                Happened::Started { .. } => {
                    if let Some((a, _)) = &mut open {
                        a["started_at"] = json!(at);
                    }
                }
                Happened::Node { node, class } => {
                    if let Some((a, running)) = &mut open {
                        close_node(a, running, at);
                        if let Some(nodes) = a["nodes"].as_array_mut() {
                            nodes.push(json!({
                                "node": node, "class": class, "start": at, "end": null,
                                "cached": false, "previews": 0,
                            }));
                            *running = Some(nodes.len() - 1);
                        }
                    }
                }
                Happened::Cached { nodes, classes } => {
                    if let Some((a, _)) = &mut open
                        && let Some(list) = a["nodes"].as_array_mut()
                    {
                        for (i, node) in nodes.iter().enumerate() {
                            list.push(json!({
                                "node": node, "class": classes.get(i), "start": at, "end": at,
                                "cached": true, "previews": 0,
                            }));
                        }
                    }
                }
                Happened::Previews { node, count } => {
                    if let Some((a, Some(i))) = &mut open
                        && node.as_deref().is_none_or(|n| a["nodes"][*i]["node"] == n)
                    {
                        let had = a["nodes"][*i]["previews"].as_u64().unwrap_or(0);
                        a["nodes"][*i]["previews"] = json!(had + u64::from(*count));
                    }
                }
                Happened::Ran => {
                    if let Some((a, running)) = &mut open {
                        close_node(a, running, at);
                        a["ended_at"] = json!(at);
                        a["end"] = json!("ran");
                    }
                }
                Happened::Requeued { reason } => {
                    if let Some((mut a, mut running)) = open.take() {
                        close_node(&mut a, &mut running, at);
                        if a["ended_at"].is_null() {
                            a["ended_at"] = json!(at);
                        }
                        a["end"] = json!(format!("requeued: {reason}"));
                        attempts.push(a);
                    }
                }
                Happened::Finished { outcome: o } => {
                    if let Some((a, running)) = &mut open {
                        close_node(a, running, at);
                        if a["ended_at"].is_null() {
                            a["ended_at"] = json!(at);
                        }
                        if a["end"].is_null() || a["end"] == "ran" {
                            a["end"] = json!(o);
                        }
                    }
                    finished_at = Some(at);
                    outcome = Some(o.clone());
                }
            }
        }
        if let Some((a, _)) = open {
            attempts.push(a);
        }
        json!({
            "submitted_at": submitted_at, "finished_at": finished_at, "outcome": outcome,
            "attempts": attempts, "marks": self.marks, "dropped_marks": self.dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node: &str, class: &str) -> Happened {
        Happened::Node {
            node: node.into(),
            class: class.into(),
        }
    }

    #[test]
    fn a_prompt_moved_off_a_dead_backend_shows_both_attempts() {
        let mut t = Timeline::default();
        t.mark(0, Happened::Submitted);
        let sent = |b: &str| Happened::Dispatched {
            backend: b.into(),
            reason: "sooner".into(),
        };
        t.mark(10, sent("a"));
        t.mark(
            20,
            Happened::Started {
                backend: "a".into(),
            },
        );
        t.mark(
            20,
            Happened::Cached {
                nodes: vec!["1".into()],
                classes: vec!["CheckpointLoaderSimple".into()],
            },
        );
        t.mark(21, node("2", "KSampler"));
        t.preview(25, Some("2"));
        t.preview(26, Some("2"));
        t.mark(
            40,
            Happened::Requeued {
                reason: "the backend is down".into(),
            },
        );
        t.mark(50, sent("b"));
        t.mark(
            55,
            Happened::Started {
                backend: "b".into(),
            },
        );
        t.mark(56, node("2", "KSampler"));
        t.mark(80, node("3", "SaveImage"));
        t.mark(90, Happened::Ran);
        t.mark(
            95,
            Happened::Finished {
                outcome: "success".into(),
            },
        );
        let v = t.view();
        let a = v["attempts"].as_array().unwrap();
        assert_eq!(a.len(), 2, "{v:#}");
        assert_eq!(a[0]["backend"], "a");
        assert_eq!(a[0]["end"], "requeued: the backend is down");
        assert_eq!(a[0]["nodes"][0]["cached"], true);
        assert_eq!(a[0]["nodes"][0]["class"], "CheckpointLoaderSimple");
        assert_eq!(
            a[0]["nodes"][1]["end"], 40,
            "the node cut short ends with the attempt"
        );
        assert_eq!(a[0]["nodes"][1]["previews"], 2);
        assert_eq!(a[1]["backend"], "b");
        assert_eq!(a[1]["nodes"][0]["start"], 56);
        assert_eq!(a[1]["nodes"][0]["end"], 80);
        assert_eq!(a[1]["nodes"][1]["end"], 90);
        assert_eq!(a[1]["end"], "success");
        assert_eq!(
            (v["submitted_at"].clone(), v["finished_at"].clone()),
            (json!(0), json!(95))
        );
        let back: Timeline = serde_json::from_value(json!({ "marks": v["marks"] })).unwrap();
        assert_eq!(back, t, "marks read back as written (the store keeps them)");
    }

    #[test]
    fn marks_past_the_cap_are_counted_not_kept_but_the_end_still_shows() {
        let mut t = Timeline::default();
        for i in 0..MAX_MARKS + 5 {
            t.mark(i as i64, node(&i.to_string(), "X"));
        }
        assert_eq!((t.marks.len(), t.dropped), (MAX_MARKS, 5));
        t.mark(
            9999,
            Happened::Finished {
                outcome: "success".into(),
            },
        );
        assert_eq!(t.view()["outcome"], "success");
    }

    #[test]
    fn an_attempt_sent_again_without_a_requeue_mark_is_closed() {
        let mut t = Timeline::default();
        let sent = |b: &str| Happened::Dispatched {
            backend: b.into(),
            reason: "r".into(),
        };
        t.mark(1, sent("a"));
        t.mark(5, sent("b"));
        let v = t.view();
        assert_eq!(v["attempts"][0]["end"], "requeued");
        assert_eq!(v["attempts"][0]["ended_at"], 5);
        assert!(
            v["attempts"][1]["end"].is_null(),
            "the second is still going"
        );
    }

    #[test]
    fn a_timeline_that_is_off_stays_off_across_the_store() {
        let mut t = Timeline::off();
        t.mark(1, Happened::Submitted);
        let back: Timeline = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        let mut back = back;
        back.mark(2, Happened::Submitted);
        assert!(back.marks.is_empty());
    }
}
