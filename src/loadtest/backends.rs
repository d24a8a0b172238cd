//! Which backend ran each prompt, for the report's per-backend share.
//!
//! The gate's client API never says: `/history/{id}` entries and the relayed events are the
//! backend's own, exactly as ComfyUI writes them, with nothing that names the backend (by design:
//! a client sees one ComfyUI). The gate's admin listener does: `GET /admin/decisions` lists its
//! recent placements (`prompt_id`, `chosen`), oldest first. It keeps only the last few hundred,
//! so the list is read every [`POLL`] during the run and once more at its end, and a prompt's
//! last placement wins (a retry's backend is the one that ran it). The admin listener is
//! usually on localhost only, so this is opt-in (`--admin-url`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::LoadTestError;
use super::client::Target;

/// How often the decisions are read during the run.
const POLL: Duration = Duration::from_millis(200);

/// prompt_id → the backend its last placement chose.
type Chosen = Arc<Mutex<HashMap<String, String>>>;

/// Reads the gate's placements in the background until [`Placements::finish`].
pub(crate) struct Placements {
    target: Arc<Target>,
    chosen: Chosen,
    task: tokio::task::JoinHandle<()>,
}

/// A run that ends early (an error before `finish`) stops the reading too.
impl Drop for Placements {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Placements {
    /// Checks that `admin_url` answers `/admin/decisions` and starts reading it.
    pub async fn start(admin_url: &str) -> Result<Self, LoadTestError> {
        let target = Arc::new(Target::parse(admin_url)?);
        let chosen = Chosen::default();
        read(&target, &chosen)
            .await
            .map_err(|reason| LoadTestError::Admin {
                url: target.base.clone(),
                reason,
            })?;
        let task = tokio::spawn({
            let (target, chosen) = (target.clone(), chosen.clone());
            async move {
                loop {
                    tokio::time::sleep(POLL).await;
                    // A failed read is tried again at the next tick (and once more at the end).
                    let _ = read(&target, &chosen).await;
                }
            }
        });
        Ok(Self {
            target,
            chosen,
            task,
        })
    }

    /// Stops reading after one last read; prompt_id → backend name.
    pub async fn finish(self) -> HashMap<String, String> {
        self.task.abort();
        let _ = read(&self.target, &self.chosen).await;
        std::mem::take(&mut *self.chosen.lock().unwrap())
    }
}

/// One read of `/admin/decisions` into `chosen`; `Err` says why it could not be read.
async fn read(target: &Target, chosen: &Mutex<HashMap<String, String>>) -> Result<(), String> {
    let (code, body) = target.get("/admin/decisions").await?;
    if code != 200 {
        return Err(format!("GET /admin/decisions answered HTTP {code}"));
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|_| "GET /admin/decisions did not answer JSON".to_string())?;
    let decisions = value["decisions"]
        .as_array()
        .ok_or("GET /admin/decisions has no `decisions` list")?;
    let mut chosen = chosen.lock().unwrap();
    for d in decisions {
        if let (Some(id), Some(backend)) = (d["prompt_id"].as_str(), d["chosen"].as_str()) {
            chosen.insert(id.to_string(), backend.to_string());
        }
    }
    Ok(())
}
