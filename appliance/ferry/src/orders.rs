//! A configured role's side of step orders (`ferry_api::orders`): it asks the configuration
//! server about every second for the orders addressed to it, runs each on its own data
//! ([`ferry_failover::agent::Agent`]: a master target's repository, key and work directory, a
//! process server's journals) and posts the answer.
//!
//! Each answer is kept in `{state}/orders/{id}.json` before it is posted: an order sent again
//! (the configuration server restarted while it was in flight, or the answer was lost) is
//! answered from there and not run twice. Orders in flight are polled for again while they
//! run, which tells the server the role is alive. After a restart of the role, the test
//! failovers' instant-access servers it ran are served again on the ports their overlays name.

use crate::bootstrap::BootstrapArgs;
use ferry_api::{Order, OrderResult, SiteAnswer, SiteStep};
use ferry_config_server::client::{Client, Method};
use ferry_failover::agent::Agent;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a role asks for orders.
const POLL: Duration = Duration::from_secs(1);

/// An order and the answer this role gave.
#[derive(Serialize, Deserialize)]
struct Answered {
    order: Order,
    result: OrderResult,
}

/// Take orders on a thread of its own, for as long as the process runs.
pub fn take(args: &BootstrapArgs, agent: Arc<Agent>) {
    let me = args.clone();
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-orders")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "no runtime for step orders");
                return;
            }
        };
        rt.block_on(run(me, agent));
    });
}

async fn run(args: BootstrapArgs, agent: Arc<Agent>) {
    let dir = args.state.join("orders");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        tracing::error!(error = %e, dir = %dir.display(), "cannot keep step orders; taking none");
        return;
    }
    serve_again(&dir, &agent).await;
    let running: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut client: Option<Client> = None;
    loop {
        if client.is_none() {
            client = args
                .client()
                .map_err(|e| tracing::warn!(error = %e, "step orders"))
                .ok();
        }
        let Some(c) = client.clone() else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        match c.get::<Vec<Order>>("/v1/roles/orders").await {
            Ok(orders) => {
                for o in orders {
                    if !running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(o.id)
                    {
                        continue;
                    }
                    let (c, agent, dir, running) =
                        (c.clone(), agent.clone(), dir.clone(), running.clone());
                    tokio::spawn(async move {
                        let id = o.id;
                        answer(&c, &agent, &dir, o).await;
                        running
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "asking the configuration server for step orders"),
        }
        tokio::time::sleep(POLL).await;
    }
}

fn kept(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Run an order (or find the answer given before) and post the answer.
async fn answer(c: &Client, agent: &Agent, dir: &Path, order: Order) {
    let path = kept(dir, order.id);
    let before = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Answered>(&b).ok());
    let result = match before {
        Some(a) => {
            tracing::info!(order = order.id, "order sent again: answering as before");
            a.result
        }
        None => {
            tracing::info!(order = order.id, step = %order.step_name, what = order.step.what(), job = ?order.job, "running a step order");
            let result = match agent.execute(&order.step).await {
                Ok(a) => OrderResult {
                    answer: Some(a),
                    error: None,
                },
                Err(e) => OrderResult {
                    answer: None,
                    error: Some(e.to_string()),
                },
            };
            let a = Answered {
                order: order.clone(),
                result,
            };
            if let Err(e) = keep(&path, &a) {
                tracing::warn!(order = order.id, error = %e, "cannot keep the answer of an order");
            }
            a.result
        }
    };
    let url = format!("/v1/roles/orders/{}/result", order.id);
    if let Err(e) = c.call::<_, Order>(Method::POST, &url, Some(&result)).await {
        // Fetched again at the next poll while the server still waits, and answered from the
        // kept answer.
        tracing::warn!(order = order.id, error = %e, "posting the answer of an order");
    }
}

fn keep(path: &Path, a: &Answered) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(a)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Serve again the test failovers this role served before it restarted: for each plan, the
/// last order that served or stopped serving it says whether one runs, and on which port.
async fn serve_again(dir: &Path, agent: &Agent) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut answered: Vec<Answered> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    answered.sort_by_key(|a| a.order.id);
    let mut last: BTreeMap<(String, String), Option<SiteStep>> = BTreeMap::new();
    for a in answered {
        match (a.order.step, a.result.answer) {
            (
                SiteStep::Serve {
                    tenant,
                    plan,
                    disks,
                    ..
                },
                Some(SiteAnswer::Served { port }),
            ) => {
                let again = SiteStep::Serve {
                    tenant: tenant.clone(),
                    plan: plan.clone(),
                    disks,
                    port,
                };
                last.insert((tenant, plan), Some(again));
            }
            (SiteStep::StopServing { tenant, plan }, _)
            | (SiteStep::DiscardScratch { tenant, plan }, _) => {
                last.insert((tenant, plan), None);
            }
            _ => {}
        }
    }
    for ((tenant, plan), step) in last {
        let Some(step) = step else { continue };
        match agent.execute(&step).await {
            Ok(_) => tracing::info!(%tenant, %plan, "serving a test failover's points again"),
            Err(e) => {
                tracing::error!(%tenant, %plan, error = %e, "cannot serve a test failover's points again")
            }
        }
    }
}
