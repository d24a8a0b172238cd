//! What the gate is doing right now, in one look under the scheduler's lock: prompts waiting
//! by band and by user (with the oldest wait), and what each backend is running (prompt, node,
//! progress). The admin layer turns it into `/metrics` gauges and the dashboard's fleet
//! snapshots; nothing here is kept.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Scheduler;
use super::prompts::Stage;
use crate::protocol::now_ms;

/// Prompts waiting in the gate queue under one key (a band or a user).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Waiting {
    pub prompts: usize,
    /// How long the one waiting longest has waited (ms).
    pub oldest_ms: i64,
}

/// A prompt running on a backend (between `execution_start` and its end).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Running {
    pub prompt_id: String,
    /// The node executing now (ComfyUI's display id) and its class; `None` between nodes.
    pub node: Option<String>,
    pub class: Option<String>,
    /// The node's last `progress`, `value / max` in 0..=1.
    pub progress: Option<f64>,
    /// Since when it runs (ms since the epoch; the `Started` mark of its timeline).
    pub started_at: Option<i64>,
    pub user: Option<String>,
}

/// The gate's activity at one moment.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Activity {
    /// Every configured band (0 when none waits), then any other band a restored prompt has.
    pub by_band: BTreeMap<String, Waiting>,
    /// Users (or `ip:ADDR` tenants) with prompts waiting.
    pub by_user: BTreeMap<String, Waiting>,
    /// Backend name → the prompt it runs.
    pub running: BTreeMap<String, Running>,
    /// Prompts sent to backends and not finished (running or waiting there).
    pub in_flight: usize,
}

impl Scheduler {
    /// The gate's activity now.
    pub fn activity(&self) -> Activity {
        let now = now_ms();
        let mut a = Activity::default();
        for band in &self.config.load().auth.bands {
            a.by_band.insert(band.clone(), Waiting::default());
        }
        let s = self.lock();
        let count = |map: &mut BTreeMap<String, Waiting>, key: &str, since: i64| {
            let w = map.entry(key.to_string()).or_default();
            w.prompts += 1;
            w.oldest_ms = w.oldest_ms.max(now - since);
        };
        for r in s.table.queued() {
            count(&mut a.by_band, &r.tenant.band, r.create_time);
            let user = r.tenant.user.as_deref().unwrap_or(&r.tenant.key);
            count(&mut a.by_user, user, r.create_time);
        }
        a.in_flight = s.table.in_flight();
        for b in self.fleet.backends().iter() {
            let Some(id) = s.table.running_on(b.name()) else {
                continue;
            };
            let Some(r) = s.table.get(id).filter(|r| r.stage != Stage::Done) else {
                continue;
            };
            let class = r
                .last_node
                .as_deref()
                .map(|n| r.class_of(n))
                .filter(|c| !c.is_empty())
                .map(str::to_string);
            let started_at = r.timeline.marks.iter().rev().find_map(|m| match m.what {
                super::timeline::Happened::Started { .. } => Some(m.at),
                _ => None,
            });
            a.running.insert(
                b.name().to_string(),
                Running {
                    prompt_id: r.id.clone(),
                    node: r.last_node.clone(),
                    class,
                    progress: r.progress.map(|(v, max)| (v / max).clamp(0.0, 1.0)),
                    started_at,
                    user: r.tenant.user.clone(),
                },
            );
        }
        a
    }

    /// The timeline of prompt `id` as `GET /admin/prompts/{id}/timeline` serves it
    /// ([`super::timeline::Timeline::view`]), with its stage; `None` for an unknown id (or one
    /// whose history entry was pruned).
    pub fn timeline(&self, id: &str) -> Option<serde_json::Value> {
        // Copied under the lock, written out after it.
        let (timeline, stage, user) = {
            let s = self.lock();
            let r = s.table.get(id)?;
            (r.timeline.clone(), r.stage, r.tenant.user.clone())
        };
        let mut v = timeline.view();
        v["prompt_id"] = id.into();
        v["stage"] = serde_json::to_value(stage).unwrap_or_default();
        v["user"] = user.into();
        Some(v)
    }
}
