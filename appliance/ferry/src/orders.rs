//! A configured role's side of step orders (`ferry_api::orders`): it asks the configuration
//! server about every second for the orders addressed to it, runs each on its own data
//! ([`ferry_failover::agent::Agent`]: a master target's repository, key and work directory, a
//! process server's journals) and posts the answer.
//!
//! Each answer is kept in `{state}/orders/{id}.json` before it is posted: an order sent again
//! (the configuration server restarted while it was in flight, or the answer was lost) is
//! answered from there and not run twice. Orders in flight are polled for again while they
//! run, which tells the server the role is alive; a long one (a resync) also posts how far it
//! has come. After a restart of the role, the test failovers' instant-access servers it ran
//! are served again on the ports their overlays name.
//!
//! An answer is forgotten once the server no longer keeps its order (its job ended), except
//! the one that serves a running test failover, which the restart needs: so `{state}/orders/`
//! holds the answers of the running jobs and of the served tests, however many jobs ran.

use crate::bootstrap::BootstrapArgs;
use ferry_api::{Order, OrderProgress, OrderResult, SiteAnswer, SiteStep};
use ferry_config_server::client::{Client, Method};
use ferry_failover::agent::Agent;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a role asks for orders.
const POLL: Duration = Duration::from_secs(1);
/// How often a role forgets the answers it no longer needs.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// How often, at most, a role posts the progress of an order it runs.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

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
    let mut stamp = args.identity_stamp();
    let mut pruned: Option<std::time::Instant> = None;
    let pruning = Arc::new(AtomicBool::new(false));
    loop {
        // A renewed identity (`ferry ctl renew`) is used from the next poll on.
        let now = args.identity_stamp();
        if now != stamp {
            stamp = now;
            client = None;
        }
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
        // On a task of its own (one at a time), so that a slow answer about a kept order
        // never delays fetching new ones.
        if pruned.is_none_or(|p| p.elapsed() >= PRUNE_EVERY) && !pruning.swap(true, SeqCst) {
            let busy = running.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let (c, dir, pruning) = (c.clone(), dir.clone(), pruning.clone());
            tokio::spawn(async move {
                prune(&c, &dir, &busy).await;
                pruning.store(false, SeqCst);
            });
            pruned = Some(std::time::Instant::now());
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
            let result = match execute(c, agent, &order).await {
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

/// Run an order, posting how far it has come while it runs (at most every
/// [`PROGRESS_EVERY`], the newest only), and the last progress before the answer.
async fn execute(c: &Client, agent: &Agent, order: &Order) -> ferry_failover::Result<SiteAnswer> {
    let (tx, mut rx) = tokio::sync::watch::channel(None::<OrderProgress>);
    let report: ferry_failover::agent::Progress = Arc::new(move |p| {
        tx.send_replace(Some(p));
    });
    let url = format!("/v1/roles/orders/{}/progress", order.id);
    let post = |p: OrderProgress| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            if let Err(e) = c.call::<_, Order>(Method::POST, &url, Some(&p)).await {
                tracing::debug!(error = %e, "posting an order's progress");
            }
        }
    };
    let work = agent.execute_reporting(&order.step, report);
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => {
                // The progress at the end (all compared) before the answer, so that the step
                // showed it; cheap, and skipped when nothing was reported.
                let last = rx.borrow_and_update().clone();
                if let Some(p) = last {
                    post(p).await;
                }
                return r;
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return work.await;
                }
                let p = rx.borrow_and_update().clone();
                if let Some(p) = p {
                    post(p).await;
                }
                tokio::time::sleep(PROGRESS_EVERY).await;
            }
        }
    }
}

fn keep(path: &Path, a: &Answered) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(a)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The answers kept in `dir`, in the order the server gave them.
fn kept_answers(dir: &Path) -> Vec<Answered> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut answered: Vec<Answered> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    answered.sort_by_key(|a| a.order.id);
    answered
}

/// For each plan, the last answered order that served or stopped serving its test failover:
/// the order that serves it (its id, and the step to serve it again on the same port), or
/// none when it is not served.
fn last_served(answered: Vec<Answered>) -> BTreeMap<(String, String), Option<(u64, SiteStep)>> {
    let mut last = BTreeMap::new();
    for a in answered {
        let id = a.order.id;
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
                last.insert((tenant, plan), Some((id, again)));
            }
            (SiteStep::StopServing { tenant, plan }, _)
            | (SiteStep::DiscardScratch { tenant, plan }, _) => {
                last.insert((tenant, plan), None);
            }
            _ => {}
        }
    }
    last
}

/// Forget the answers of the orders the configuration server no longer keeps (their job
/// ended, or they were its own housekeeping, or withdrawn), but for those that serve a running
/// test failover: a restarted role serves it again from them ([`serve_again`]). Answers of
/// orders still kept stay, to be given again if the order is sent again; so do those of
/// orders running (`busy`) and any the server could not be asked about.
async fn prune(c: &Client, dir: &Path, busy: &HashSet<u64>) {
    let answered = kept_answers(dir);
    if answered.is_empty() {
        return;
    }
    let plans: Vec<(u64, Option<Plan>)> = answered
        .iter()
        .map(|a| (a.order.id, served_plan(&a.order.step)))
        .collect();
    let serving: HashSet<u64> = last_served(answered)
        .into_values()
        .flatten()
        .map(|(id, _)| id)
        .collect();
    // Ask about each answer that may go, oldest first, until the server cannot say.
    let mut gone = HashSet::new();
    for (id, _) in &plans {
        if serving.contains(id) || busy.contains(id) {
            continue;
        }
        match order_gone(c, *id).await {
            Some(true) => {
                gone.insert(*id);
            }
            Some(false) => {}
            None => break,
        }
    }
    let mut forgot = 0;
    for id in forgettable(&plans, &gone) {
        if let Err(e) = std::fs::remove_file(kept(dir, id)) {
            // The next pass tries again; until then, later answers about its plan stay too.
            tracing::warn!(order = id, error = %e, "cannot forget an answer");
            break;
        }
        forgot += 1;
    }
    if forgot > 0 {
        tracing::info!(forgot, "forgot the answers of orders whose jobs ended");
    }
}

/// A test failover's plan: (tenant, plan).
type Plan = (String, String);

/// Of the kept answers `plans` (oldest first, each with the plan whose serving it starts or
/// stops, if it does), those to forget, oldest first: the server no longer keeps their order
/// (`gone`), and no answer before them about the same plan stays — an answer that stops
/// serving a plan goes only with those before it that served it, else a restart would serve
/// the plan again from those.
fn forgettable(plans: &[(u64, Option<Plan>)], gone: &HashSet<u64>) -> Vec<u64> {
    let mut stayed: HashSet<&Plan> = HashSet::new();
    let mut out = Vec::new();
    for (id, plan) in plans {
        if gone.contains(id) && !plan.as_ref().is_some_and(|p| stayed.contains(p)) {
            out.push(*id);
        } else {
            stayed.extend(plan);
        }
    }
    out
}

/// The plan whose test failover's serving an order starts or stops.
fn served_plan(step: &SiteStep) -> Option<Plan> {
    match step {
        SiteStep::Serve { tenant, plan, .. }
        | SiteStep::StopServing { tenant, plan }
        | SiteStep::DiscardScratch { tenant, plan } => Some((tenant.clone(), plan.clone())),
        _ => None,
    }
}

/// Whether the configuration server no longer keeps order `id`: none when it cannot say.
async fn order_gone(c: &Client, id: u64) -> Option<bool> {
    match c.get::<Order>(&format!("/v1/roles/orders/{id}")).await {
        Ok(_) => Some(false),
        Err(ferry_config_server::client::ClientError::Api {
            status: 404, code, ..
        }) if code == ferry_api::NO_SUCH_ORDER => Some(true),
        Err(e) => {
            tracing::debug!(order = id, error = %e, "asking whether an order is kept");
            None
        }
    }
}

/// Serve again the test failovers this role served before it restarted: for each plan, the
/// last order that served or stopped serving it says whether one runs, and on which port.
async fn serve_again(dir: &Path, agent: &Agent) {
    for ((tenant, plan), step) in last_served(kept_answers(dir)) {
        let Some((_, step)) = step else { continue };
        match agent.execute(&step).await {
            Ok(_) => tracing::info!(%tenant, %plan, "serving a test failover's points again"),
            Err(e) => {
                tracing::error!(%tenant, %plan, error = %e, "cannot serve a test failover's points again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{forgettable, Plan};
    use std::collections::HashSet;

    fn p(name: &str) -> Option<Plan> {
        Some(("acme".to_string(), name.to_string()))
    }

    #[test]
    fn an_answer_that_stops_serving_goes_only_with_the_ones_that_served_before_it() {
        let gone = |ids: &[u64]| ids.iter().copied().collect::<HashSet<u64>>();
        // A test failover (points, serve, scratch) and its cleanup (stop, discard), all ended.
        let plans = [
            (1, None),
            (2, p("dr")),
            (3, None),
            (4, p("dr")),
            (5, p("dr")),
        ];
        assert_eq!(
            forgettable(&plans, &gone(&[1, 2, 3, 4, 5])),
            [1, 2, 3, 4, 5]
        );
        // The server still keeps the serve order: the stops after it stay with it.
        assert_eq!(forgettable(&plans, &gone(&[1, 3, 4, 5])), [1, 3]);
        // Another plan's answers do not hold these back.
        let plans = [(1, p("other")), (2, p("dr")), (3, p("dr"))];
        assert_eq!(forgettable(&plans, &gone(&[2, 3])), [2, 3]);
        assert!(forgettable(&plans, &gone(&[])).is_empty());
    }
}
