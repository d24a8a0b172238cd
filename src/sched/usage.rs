//! GPU time per tenant: the ledger behind `GET /admin/usage` and the `gpu_seconds_per_day`
//! quota ([`Usage::gpu_seconds_today`]).
//!
//! Why a ledger of its own and not a sum over history entries: history is pruned by count and
//! age (a week by default) and deleted by clients, while usage is billed by the month and a
//! quota must be answered on every submit without a scan. So every prompt that ends is charged
//! once, when it ends ([`super::audit`] computes the charge, the same figures its audit line
//! shows), into a row per tenant and UTC hour: integer milliseconds, so sums are exact and the
//! sum of the rows equals the sum of the audit lines. An hour is the finest `since` a query
//! can ask; a day's 24 rows answer the quota.
//!
//! Rows are persisted in the state store by one flusher task ([`flush_loop`]): a charge only
//! touches memory (no request or event thread waits for a disk), the flusher writes the rows
//! that changed in one transaction (many ends, one commit under load) and once more at
//! shutdown, so a restart keeps the ledger; a crash loses at most the charges of the last
//! moment. Rows older than [`KEPT_DAYS`] are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::store::{Store, StoreError};
use super::tenant::Tenant;
use crate::protocol::now_ms;

/// Milliseconds in an hour: the ledger's bucket.
pub const HOUR_MS: i64 = 3_600_000;
/// Milliseconds in a day.
pub const DAY_MS: i64 = 24 * HOUR_MS;
/// Days of usage kept (a year of monthly reports, and a month's slack).
pub const KEPT_DAYS: i64 = 400;

/// One tenant's usage in one UTC hour.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The tenant's user name (auth on), as its audit lines show it.
    #[serde(default)]
    pub user: Option<String>,
    /// GPU time charged, in ms (run time × GPUs).
    #[serde(default)]
    pub gpu_ms: u64,
    /// Run time charged, in ms.
    #[serde(default)]
    pub run_ms: u64,
    /// Prompts that ended, by outcome (`success`, `error`, `interrupted`, `failed`,
    /// `deleted`).
    #[serde(default)]
    pub outcomes: BTreeMap<String, u64>,
}

impl Row {
    /// Prompts that ended.
    pub fn prompts(&self) -> u64 {
        self.outcomes.values().sum()
    }

    fn add(&mut self, other: &Row) {
        self.gpu_ms += other.gpu_ms;
        self.run_ms += other.run_ms;
        for (k, n) in &other.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += n;
        }
        if self.user.is_none() {
            self.user.clone_from(&other.user);
        }
    }
}

/// What one prompt that ended is charged.
#[derive(Clone, Debug)]
pub struct Charge<'a> {
    /// When it ended, ms since the epoch (its hour and UTC day).
    pub at_ms: i64,
    pub tenant: &'a Tenant,
    pub run_ms: u64,
    pub gpu_ms: u64,
    pub outcome: &'a str,
}

/// A tenant's sums over the hours a query covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantUsage {
    /// The tenant key (`user:NAME`, `ip:ADDR`).
    pub tenant: String,
    pub usage: Row,
}

/// `(tenant key, hour since the epoch)`: one tenant's hours lie side by side.
type Key = (String, i64);

#[derive(Default)]
struct Ledger {
    rows: BTreeMap<Key, Row>,
    /// Rows changed since the last flush.
    dirty: BTreeSet<Key>,
    /// Rows pruned since the last flush.
    removed: Vec<Key>,
    /// The oldest hour kept after the last prune.
    kept_from: i64,
}

impl Ledger {
    /// Drops the rows of hours before `from`.
    fn prune(&mut self, from: i64) {
        if from <= self.kept_from {
            return;
        }
        self.kept_from = from;
        let old: Vec<Key> = self
            .rows
            .keys()
            .filter(|(_, hour)| *hour < from)
            .cloned()
            .collect();
        for k in old {
            self.rows.remove(&k);
            self.dirty.remove(&k);
            self.removed.push(k);
        }
    }
}

/// The usage ledger (see the module docs).
pub struct Usage {
    ledger: Mutex<Ledger>,
    store: Arc<Store>,
    /// Wakes the flusher.
    changed: Notify,
    /// One flush at a time, so the last write of a row is its latest value.
    flushing: Mutex<()>,
}

fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// The first hour kept at `now_ms`.
fn kept_from(now_ms: i64) -> i64 {
    hour_of(now_ms) - KEPT_DAYS * 24
}

fn store_key((tenant, hour): &Key) -> String {
    serde_json::json!([hour, tenant]).to_string()
}

impl Usage {
    /// The ledger over `store`, with the rows a restart loaded (`(key, row)` as stored).
    /// Rows it cannot read are skipped with a warning (they are not the prompts' state).
    pub fn new(store: Arc<Store>, loaded: Vec<(String, Value)>) -> Self {
        let mut ledger = Ledger::default();
        for (k, v) in loaded {
            let key: Result<(i64, String), _> = serde_json::from_str(&k);
            match (key, serde_json::from_value::<Row>(v)) {
                (Ok((hour, tenant)), Ok(row)) => {
                    ledger.rows.insert((tenant, hour), row);
                }
                _ => tracing::warn!(key = %k, "an unreadable usage row was skipped"),
            }
        }
        ledger.kept_from = i64::MIN;
        ledger.prune(kept_from(now_ms()));
        Self {
            ledger: Mutex::new(ledger),
            store,
            changed: Notify::new(),
            flushing: Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charges one prompt that ended to its tenant's row for that hour (memory only; the
    /// flusher persists it).
    pub fn charge(&self, c: &Charge<'_>) {
        let key = (c.tenant.key.clone(), hour_of(c.at_ms));
        {
            let mut l = self.lock();
            if key.1 < l.kept_from {
                return;
            }
            let row = l.rows.entry(key.clone()).or_default();
            row.gpu_ms += c.gpu_ms;
            row.run_ms += c.run_ms;
            *row.outcomes.entry(c.outcome.to_string()).or_default() += 1;
            if row.user.is_none() {
                row.user.clone_from(&c.tenant.user);
            }
            l.dirty.insert(key);
        }
        self.changed.notify_one();
    }

    /// GPU-seconds charged to `tenant_key` (`user:NAME`, `ip:ADDR`: [`Tenant::key`]) in the
    /// current UTC day, by prompts that ended (a prompt still running is charged when it ends,
    /// to the day it ends in). For the `gpu_seconds_per_day` quota: at most 24 rows read
    /// under one short lock.
    pub fn gpu_seconds_today(&self, tenant_key: &str) -> f64 {
        self.gpu_seconds_on_day(tenant_key, now_ms().div_euclid(DAY_MS))
    }

    /// GPU-seconds charged to `tenant_key` on UTC day `day` (days since the epoch).
    pub fn gpu_seconds_on_day(&self, tenant_key: &str, day: i64) -> f64 {
        let first = day * 24;
        let from = (tenant_key.to_string(), first);
        let to = (tenant_key.to_string(), first + 24);
        let ms: u64 = self
            .lock()
            .rows
            .range(from..to)
            .map(|(_, r)| r.gpu_ms)
            .sum();
        ms as f64 / 1000.0
    }

    /// Each tenant's sums over the hours from the one holding `since_ms` (all kept hours
    /// without it), for tenants `who` names (all without it): `who` is a tenant key
    /// (`user:NAME`, `ip:ADDR`) or a user name. Largest GPU time first.
    pub fn summary(&self, who: Option<&str>, since_ms: Option<i64>) -> Vec<TenantUsage> {
        let from = since_ms.map_or(i64::MIN, hour_of);
        let named = |tenant: &str| {
            who.is_none_or(|w| tenant == w || tenant.strip_prefix("user:") == Some(w))
        };
        let mut sums: BTreeMap<String, Row> = BTreeMap::new();
        for ((tenant, hour), row) in self.lock().rows.iter() {
            if *hour >= from && named(tenant) {
                sums.entry(tenant.clone()).or_default().add(row);
            }
        }
        let mut out: Vec<TenantUsage> = sums
            .into_iter()
            .map(|(tenant, usage)| TenantUsage { tenant, usage })
            .collect();
        out.sort_by(|a, b| {
            b.usage
                .gpu_ms
                .cmp(&a.usage.gpu_ms)
                .then_with(|| a.tenant.cmp(&b.tenant))
        });
        out
    }

    /// Rows held (one per tenant and hour with usage).
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    /// Whether no usage is held.
    pub fn is_empty(&self) -> bool {
        self.lock().rows.is_empty()
    }

    /// Writes the rows changed since the last flush (and drops pruned ones) in one durable
    /// transaction; returns how many rows it wrote or removed. On failure they stay to be
    /// written next time. Blocking: the flusher calls it off the runtime's threads.
    pub fn flush(&self) -> Result<usize, StoreError> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let (rows, removed) = {
            let mut l = self.lock();
            l.prune(kept_from(now_ms()));
            let dirty = std::mem::take(&mut l.dirty);
            let rows: Vec<(Key, Row)> = dirty
                .into_iter()
                .filter_map(|k| l.rows.get(&k).cloned().map(|r| (k, r)))
                .collect();
            (rows, std::mem::take(&mut l.removed))
        };
        if rows.is_empty() && removed.is_empty() {
            return Ok(0);
        }
        let written: Vec<(String, Vec<u8>)> = rows
            .iter()
            .map(|(k, r)| (store_key(k), serde_json::to_vec(r).unwrap_or_default()))
            .collect();
        let gone: Vec<String> = removed.iter().map(store_key).collect();
        match self.store.save_usage(&written, &gone) {
            Ok(()) => Ok(written.len() + gone.len()),
            Err(e) => {
                let mut l = self.lock();
                l.dirty.extend(rows.into_iter().map(|(k, _)| k));
                l.removed.extend(removed);
                Err(e)
            }
        }
    }
}

/// Persists the ledger whenever it changed, until `stop`; then once more.
pub async fn flush_loop(usage: Arc<Usage>, stop: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = usage.changed.notified() => false,
        };
        let u = usage.clone();
        match tokio::task::spawn_blocking(move || u.flush()).await {
            Ok(Err(e)) => tracing::error!(error = %e, "could not persist GPU usage"),
            Err(e) => tracing::error!(error = %e, "the GPU usage flush failed"),
            Ok(Ok(_)) => {}
        }
        if stopping {
            return;
        }
    }
}

/// Milliseconds since the epoch as RFC 3339 in UTC with milliseconds
/// (`2026-05-01T12:00:03.456Z`).
pub fn rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// A time as `GET /admin/usage?since=` takes it: RFC 3339 (`2026-05-01T00:00:00Z`, any
/// offset) or seconds since the epoch (`1777593600`, fractions allowed). Milliseconds since
/// the epoch, or `None` if it is neither.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs.abs() < 1e13).then(|| (secs * 1000.0).floor() as i64);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(key: &str, user: Option<&str>) -> Tenant {
        Tenant {
            key: key.into(),
            user: user.map(str::to_string),
            ..Default::default()
        }
    }

    fn ledger(dir: &std::path::Path) -> (Arc<Store>, Usage) {
        let (store, loaded) = Store::open(dir, &[]).unwrap();
        let store = Arc::new(store);
        (store.clone(), Usage::new(store, loaded.usage))
    }

    /// 2026-05-01T00:00:00Z.
    const MAY_1: i64 = 1_777_593_600_000;

    fn charge(u: &Usage, t: &Tenant, at_ms: i64, ms: u64, outcome: &str) {
        u.charge(&Charge {
            at_ms,
            tenant: t,
            run_ms: ms,
            gpu_ms: ms,
            outcome,
        });
    }

    #[test]
    fn a_day_sums_its_own_hours_only_and_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let (_, u) = ledger(dir.path());
        let alice = tenant("user:alice", Some("alice"));
        let anon = tenant("ip:10.0.0.7", None);
        let day = MAY_1 / DAY_MS;
        charge(&u, &alice, MAY_1 - 1, 5_000, "success"); // April 30th, 23:59:59.999
        charge(&u, &alice, MAY_1, 1_500, "success");
        charge(&u, &alice, MAY_1 + 23 * HOUR_MS + 59 * 60_000, 250, "error");
        charge(&u, &alice, MAY_1 + DAY_MS, 7_000, "success"); // May 2nd
        charge(&u, &anon, MAY_1 + HOUR_MS, 2_000, "success");
        assert_eq!(u.gpu_seconds_on_day("user:alice", day), 1.75);
        assert_eq!(u.gpu_seconds_on_day("user:alice", day - 1), 5.0);
        assert_eq!(u.gpu_seconds_on_day("ip:10.0.0.7", day), 2.0);
        assert_eq!(u.gpu_seconds_on_day("user:bob", day), 0.0);
        assert_eq!(
            u.gpu_seconds_on_day("user:alic", day),
            0.0,
            "a key is whole"
        );
    }

    #[test]
    fn a_summary_is_per_tenant_from_the_hour_holding_since() {
        let dir = tempfile::tempdir().unwrap();
        let (_, u) = ledger(dir.path());
        let alice = tenant("user:alice", Some("alice"));
        let anon = tenant("ip:10.0.0.7", None);
        charge(&u, &alice, MAY_1, 1_000, "success");
        charge(&u, &alice, MAY_1 + 2 * HOUR_MS + 10, 2_000, "interrupted");
        charge(&u, &alice, MAY_1 + 2 * HOUR_MS + 20, 0, "deleted");
        charge(&u, &anon, MAY_1 + 3 * HOUR_MS, 4_000, "success");
        let all = u.summary(None, None);
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[0].tenant.as_str(), all[0].usage.gpu_ms),
            ("ip:10.0.0.7", 4_000)
        );
        assert_eq!(all[1].usage.gpu_ms, 3_000);
        assert_eq!(all[1].usage.prompts(), 3);
        assert_eq!(all[1].usage.user.as_deref(), Some("alice"));
        // Since 02:30: the 02:00 hour counts whole.
        let since = u.summary(Some("alice"), Some(MAY_1 + 2 * HOUR_MS + 30 * 60_000));
        assert_eq!(since.len(), 1);
        assert_eq!(since[0].usage.gpu_ms, 2_000);
        assert_eq!(since[0].usage.outcomes["deleted"], 1);
        assert_eq!(u.summary(Some("user:alice"), None)[0].usage.gpu_ms, 3_000);
        assert_eq!(u.summary(Some("ip:10.0.0.7"), None)[0].usage.gpu_ms, 4_000);
        assert!(u.summary(Some("10.0.0.7"), None).is_empty());
        assert!(u.summary(None, Some(MAY_1 + 4 * HOUR_MS)).is_empty());
    }

    #[test]
    fn flushed_rows_survive_a_reopen_and_old_days_go() {
        let dir = tempfile::tempdir().unwrap();
        let alice = tenant("user:alice", Some("alice"));
        let now = now_ms();
        let old = store_key(&("user:alice".into(), hour_of(now) - (KEPT_DAYS + 2) * 24));
        {
            let (store, u) = ledger(dir.path());
            let row = serde_json::to_vec(&Row {
                gpu_ms: 9_000,
                ..Default::default()
            })
            .unwrap();
            store.save_usage(&[(old.clone(), row)], &[]).unwrap();
            charge(&u, &alice, now, 1_234, "success");
            charge(&u, &alice, now - (KEPT_DAYS + 1) * DAY_MS, 9_000, "success");
            assert_eq!(u.len(), 1, "a charge older than KEPT_DAYS is not kept");
            assert_eq!(u.flush().unwrap(), 1);
            assert_eq!(u.flush().unwrap(), 0, "nothing changed since");
            charge(&u, &alice, now, 1, "error");
            u.flush().unwrap();
        }
        {
            let (_, u) = ledger(dir.path());
            assert_eq!(u.len(), 1, "the stored row older than KEPT_DAYS is pruned");
            assert_eq!(u.flush().unwrap(), 1, "and removed from the store");
        }
        let (store, loaded) = Store::open(dir.path(), &[]).unwrap();
        assert_eq!(loaded.usage.len(), 1);
        assert!(loaded.usage.iter().all(|(k, _)| *k != old));
        let u = Usage::new(Arc::new(store), loaded.usage);
        assert_eq!(u.gpu_seconds_today("user:alice"), 1.235);
        let all = u.summary(None, None);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].usage.prompts(), 2);
        assert_eq!(all[0].usage.outcomes["error"], 1);
    }

    #[test]
    fn times_are_rfc3339_or_unix_seconds() {
        assert_eq!(rfc3339(MAY_1 + 3_456), "2026-05-01T00:00:03.456Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_time("2026-05-01T00:00:03.456Z"), Some(MAY_1 + 3_456));
        assert_eq!(parse_time("2026-05-01T02:00:00+02:00"), Some(MAY_1));
        assert_eq!(parse_time("1777593600"), Some(MAY_1));
        assert_eq!(parse_time("1777593600.5"), Some(MAY_1 + 500));
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("2026-05-01"), None);
        assert_eq!(parse_time("NaN"), None);
        assert_eq!(parse_time("1e300"), None);
    }
}
