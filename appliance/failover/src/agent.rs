//! Executing a job's site steps ([`SiteStep`]) where the data is: the master target runs them
//! on its own repository, key and work directory when the configuration server orders them
//! (`ferry_api::orders`), and a process server runs the drain check on its own journals and
//! the resync of reprotect and failback beside the original disks ([`split`], asking the
//! master target for the live disks' names and differing blocks), and failback's `protect`
//! of each disk ([`protect`], through its cache directory). A configuration server
//! started with the recovery site's paths (`--recovery-repo ...`) runs the same code in its
//! own process (the resync there reads both disks itself: [`resync`]).
//!
//! Every step may run again with the same outcome (a resent order): points are held under the
//! job's holder (holding again replaces), overlays and live disks are written whole again,
//! cleanup of what is gone is no error.

use crate::{drain, live, points, protect, resync, scratch, split, FailoverError, Result, Site};
use ferry_api::{
    ChosenDisk, ChosenMachine, DiskAt, HoldInfo, OrderProgress, ResyncReport, SiteAnswer, SiteStep,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where a long step tells how far it has come while it runs (a role posts it to the
/// configuration server, which shows it on the job's step).
pub type Progress = Arc<dyn Fn(OrderProgress) + Send + Sync>;

/// A resync's progress in words and numbers: bytes of the disk compared, blocks, bytes sent.
/// `now`: what the resync is doing besides (a split resync that lost its connection:
/// `reconnecting (attempt 3) after: ...`).
pub fn resync_progress(r: &ResyncReport, now: Option<&str>) -> OrderProgress {
    let blocks = r.disk_bytes.div_ceil(resync::BLOCK);
    let mut detail = format!(
        "compared {} of {blocks} blocks, sent {} bytes ({} blocks)",
        r.blocks_compared, r.bytes_sent, r.blocks_sent
    );
    match now {
        Some(now) => detail.push_str(&format!("; {now}")),
        None if r.reconnects > 0 => {
            detail.push_str(&format!("; {} attempts to reconnect", r.reconnects))
        }
        None => {}
    }
    OrderProgress {
        done: (r.blocks_compared * resync::BLOCK).min(r.disk_bytes),
        total: r.disk_bytes,
        detail,
    }
}

/// What one role can do: a master target has a site (repository, key, work directory), a
/// process server a cache of journals.
pub struct Agent {
    pub site: Option<Site>,
    pub process_cache: Option<PathBuf>,
    /// A protected-site role's way to the master target, for the resync of reprotect and
    /// failback.
    pub protected: Option<Arc<split::Protected>>,
    /// `{tenant}/{plan}` → the instant-access server of its running test failover: its
    /// port, what it serves, and its task.
    servers: Mutex<HashMap<String, Server>>,
}

struct Server {
    port: u16,
    disks: Vec<DiskAt>,
    task: tokio::task::JoinHandle<()>,
}

fn refused(m: impl Into<String>) -> FailoverError {
    FailoverError::Refused(m.into())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| refused(format!("the step's worker died: {e}")))?
}

impl Agent {
    pub fn new(site: Option<Site>, process_cache: Option<PathBuf>) -> Arc<Agent> {
        Agent::with_protected(site, process_cache, None)
    }

    /// An agent that can also run a resync from the protected site (`protected`).
    pub fn with_protected(
        site: Option<Site>,
        process_cache: Option<PathBuf>,
        protected: Option<split::Protected>,
    ) -> Arc<Agent> {
        Arc::new(Agent {
            site,
            process_cache,
            protected: protected.map(Arc::new),
            servers: Mutex::default(),
        })
    }

    fn site(&self) -> Result<Site> {
        self.site
            .clone()
            .ok_or_else(|| refused("this role keeps no recovery repository"))
    }

    /// Stop a plan's server and wait until its listener is closed (the port is free again).
    async fn stop(&self, key: &str) -> bool {
        let old = {
            let mut s = self.servers.lock().unwrap_or_else(|e| e.into_inner());
            s.remove(key)
        };
        match old {
            Some(old) => {
                old.task.abort();
                let _ = old.task.await;
                true
            }
            None => false,
        }
    }

    /// Run one step. Blocking work runs off the runtime.
    pub async fn execute(&self, step: &SiteStep) -> Result<SiteAnswer> {
        self.execute_reporting(step, Arc::new(|_| {})).await
    }

    /// Run one step, telling `progress` how far a long one (a resync) has come as it runs.
    pub async fn execute_reporting(
        &self,
        step: &SiteStep,
        progress: Progress,
    ) -> Result<SiteAnswer> {
        match step {
            SiteStep::ChoosePoints {
                tenant,
                plan,
                holder,
                reason,
                machines,
                at_unix,
                test,
            } => {
                let site = self.site()?;
                let names: Vec<Vec<String>> = machines.iter().map(|m| m.disks.clone()).collect();
                let (s, h, r, at) = (site.clone(), holder.clone(), reason.clone(), *at_unix);
                let held =
                    blocking(move || points::choose_and_hold(&s, &h, &r, &names, at)).await?;
                let mut out = Vec::new();
                for (m, mp) in machines.iter().zip(held) {
                    let disks = m
                        .disks
                        .iter()
                        .zip(mp.points)
                        .map(|(d, p)| ChosenDisk {
                            disk: d.clone(),
                            seq: p.meta.seq,
                            created_unix_ns: p.meta.created_unix_ns,
                            path: if *test {
                                site.scratch_path(tenant, plan, &m.machine, d)
                            } else {
                                site.live_path(tenant, plan, &m.machine, d)
                            }
                            .display()
                            .to_string(),
                        })
                        .collect();
                    out.push(ChosenMachine {
                        machine: m.machine.clone(),
                        consistent: mp.consistent,
                        disks,
                    });
                }
                Ok(SiteAnswer::Points { machines: out })
            }
            SiteStep::Serve {
                tenant,
                plan,
                disks,
                port,
            } => {
                let site = self.site()?;
                let served: Vec<scratch::Served> = disks
                    .iter()
                    .map(|d| scratch::Served {
                        export: scratch::export_name(&d.machine, &d.disk),
                        disk: d.disk.clone(),
                        seq: d.seq,
                    })
                    .collect();
                let key = format!("{tenant}/{plan}");
                {
                    // Asked again (a restarted configuration server): already served.
                    let s = self.servers.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(sv) = s.get(&key) {
                        if sv.disks == *disks && (*port == 0 || *port == sv.port) {
                            return Ok(SiteAnswer::Served { port: sv.port });
                        }
                    }
                }
                self.stop(&key).await;
                let (port, task) = scratch::serve(&site, &served, *port).await?;
                let mut s = self.servers.lock().unwrap_or_else(|e| e.into_inner());
                let new = Server {
                    port,
                    disks: disks.clone(),
                    task,
                };
                if let Some(old) = s.insert(key, new) {
                    old.task.abort();
                }
                Ok(SiteAnswer::Served { port })
            }
            SiteStep::StopServing { tenant, plan } => Ok(SiteAnswer::Count {
                n: u64::from(self.stop(&format!("{tenant}/{plan}")).await),
            }),
            SiteStep::Scratch { port, disks } => {
                let repo = self.site()?.repository()?;
                let mut n = 0;
                for d in disks {
                    let size = repo
                        .points(&d.disk)?
                        .into_iter()
                        .find(|p| p.meta.seq == d.seq)
                        .map(|p| p.meta.disk_size)
                        .ok_or_else(|| {
                            refused(format!("point {} of disk {} is gone", d.seq, d.disk))
                        })?;
                    let (path, uri) = (
                        PathBuf::from(&d.path),
                        scratch::uri(*port, &scratch::export_name(&d.machine, &d.disk)),
                    );
                    blocking(move || scratch::create_overlay(&path, &uri, size)).await?;
                    n += 1;
                }
                Ok(SiteAnswer::Count { n })
            }
            SiteStep::Live { disks } => {
                let site = self.site()?;
                let mut n = 0;
                for d in disks {
                    let DiskAt {
                        disk, seq, path, ..
                    } = d.clone();
                    let s = site.clone();
                    blocking(move || live::materialize(&s, &disk, seq, &PathBuf::from(path)))
                        .await?;
                    n += 1;
                }
                Ok(SiteAnswer::Count { n })
            }
            SiteStep::DiscardScratch { tenant, plan } => {
                let dir = self.site()?.plan_dir(tenant, plan).join("test");
                let n = blocking(move || scratch::discard(&dir)).await?;
                Ok(SiteAnswer::Count { n })
            }
            SiteStep::Holds => {
                let s = self.site()?;
                let all = blocking(move || points::holds(&s)).await?;
                Ok(SiteAnswer::Holds {
                    holds: all
                        .into_iter()
                        .map(|h| HoldInfo {
                            holder: h.holder,
                            reason: h.reason,
                        })
                        .collect(),
                })
            }
            SiteStep::ListPoints { disks } => {
                let (s, disks) = (self.site()?, disks.clone());
                let points = blocking(move || list_points(&s, &disks)).await?;
                Ok(SiteAnswer::PointList { points })
            }
            SiteStep::Release { holders } => {
                let (s, hs) = (self.site()?, holders.clone());
                let released = blocking(move || {
                    let mut out = Vec::new();
                    for h in hs {
                        if points::release(&s, &h)? {
                            out.push(h);
                        }
                    }
                    Ok(out)
                })
                .await?;
                Ok(SiteAnswer::Released { holders: released })
            }
            SiteStep::Resync {
                tenant,
                plan,
                machine,
                disk,
                live,
                target,
            } => {
                if let Some(p) = self.protected.clone() {
                    // Beside the original disk: the live disk is read at the recovery site.
                    let at = split::LiveDisk {
                        tenant: tenant.clone(),
                        plan: plan.clone(),
                        machine: machine.clone(),
                        disk: disk.clone(),
                    };
                    let original = target.clone();
                    let report = blocking(move || {
                        split::run(&p, &at, &original, &mut |r, now| {
                            progress(resync_progress(r, now))
                        })
                    })
                    .await?;
                    return Ok(SiteAnswer::Resync { report });
                }
                let site = self.site()?;
                let scratch_dir = site
                    .plan_dir(tenant, plan)
                    .join("resync")
                    .join(format!("{machine}.{disk}"));
                let (src, dst) = (PathBuf::from(live), PathBuf::from(target));
                let report = blocking(move || {
                    let k = site.key()?;
                    resync::run(&src, &dst, &k, &scratch_dir, &mut |r| {
                        progress(resync_progress(r, None))
                    })
                })
                .await?;
                Ok(SiteAnswer::Resync { report })
            }
            SiteStep::Protect {
                tenant,
                plan,
                machine,
                disk,
                source,
            } => {
                let cache = self.process_cache.clone().ok_or_else(|| {
                    refused("this role has no process server cache: the process server protects its disks")
                })?;
                // Where the daemon that opens the original disk keeps its sockets: beside the
                // resync's (a process server's role), or in the site's work directory (a
                // configuration server beside the site).
                let work = match (&self.protected, &self.site) {
                    (Some(p), _) => p.work.clone(),
                    (None, Some(s)) => s.work.clone(),
                    (None, None) => return Err(refused("this role has no work directory")),
                };
                let scratch = work
                    .join(tenant)
                    .join(plan)
                    .join("protect")
                    .join(format!("{machine}.{disk}"));
                let (d, s) = (disk.clone(), source.clone());
                let done =
                    blocking(move || protect::run(&cache, &d, &s, &scratch, &mut |p| progress(p)))
                        .await?;
                Ok(SiteAnswer::Protected {
                    report: done.report,
                    point_seq: done.point_seq,
                })
            }
            SiteStep::Drain {
                disks,
                timeout_secs,
            } => {
                let cache = self.process_cache.clone().ok_or_else(|| {
                    refused("this role has no process server cache to check the journals of")
                })?;
                let since = ferry_process_server::status::now_unix_ns();
                let timeout = Duration::from_secs(*timeout_secs);
                let mut out = Vec::new();
                for d in disks {
                    let (c, dd) = (cache.clone(), d.clone());
                    let s = blocking(move || drain::wait(&c, &dd, since, timeout)).await?;
                    out.push((d.clone(), s.acked_journal_seq));
                }
                Ok(SiteAnswer::Drained { disks: out })
            }
        }
    }
}

/// The points of one machine's `disks`, each said to be the machine's when every disk has a
/// point at its cut.
fn list_points(site: &Site, disks: &[String]) -> Result<Vec<ferry_api::PointInfo>> {
    let repo = site.repository()?;
    let mut out = Vec::new();
    for d in disks {
        // A disk that has not replicated yet has no points.
        for pt in repo.points(d).unwrap_or_default() {
            out.push(ferry_api::PointInfo {
                disk: d.clone(),
                seq: pt.meta.seq,
                created_unix_ns: pt.meta.created_unix_ns,
                consistency: format!("{:?}", pt.meta.consistency).to_lowercase(),
                group_cut: pt.meta.group_cut,
                machine_consistent: false,
            });
        }
    }
    // A cut is the machine's when every one of its disks has a point at it (a single disk's
    // points are its machine's).
    let mut per_cut: HashMap<u64, usize> = HashMap::new();
    for p in &out {
        if let Some(c) = p.group_cut {
            *per_cut.entry(c).or_default() += 1;
        }
    }
    for p in &mut out {
        p.machine_consistent = disks.len() == 1
            || p.group_cut
                .is_some_and(|c| per_cut.get(&c) == Some(&disks.len()));
    }
    Ok(out)
}
