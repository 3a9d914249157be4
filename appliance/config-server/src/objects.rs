//! Create, read, replace and delete for every configuration object, written once.
//!
//! Each kind says where it lives ([`Stored::PARENTS`]), which permission writing it needs, what
//! it refers to and what refers to it; the handlers below apply the same order to all of them:
//! permission (before anything that could reveal whether an object exists), validation,
//! parents, references, write, flush.

use crate::app::{Caller, Shared};
use crate::error::{ApiError, Body};
use crate::store::{trees, Store};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use ferry_api::{validate, Action, Disk, Machine, Object, Plan, Policy, Principal, Site, Tenant};

pub trait Stored: Object {
    /// The path parameter naming one object (`{machine}`).
    const ONE: &'static str;
    const TREE: &'static str;
    /// The trees of the objects above this one, outermost first.
    const PARENTS: &'static [&'static str];
    /// What writing this kind needs.
    const WRITE: Action = Action::Configure;

    /// Objects this one names must exist (in the same tenant).
    fn check_refs(&self, _store: &Store, _tenant: &str) -> Result<(), ApiError> {
        Ok(())
    }
    /// Why this object cannot be deleted now, if it cannot.
    fn in_use(
        _store: &Store,
        _key: &str,
        _tenant: &str,
        _name: &str,
    ) -> Result<Option<String>, ApiError> {
        Ok(None)
    }
    /// Fields the server owns survive an administrator's replace.
    fn keep_server_fields(&mut self, _old: &Self) {}
    /// A permission this object's content needs beyond [`Stored::WRITE`].
    fn content_needs(&self) -> Option<Action> {
        None
    }
    /// A new object's name must not clash beyond its own parent (checked at creation).
    fn check_unique(&self, _store: &Store) -> Result<(), ApiError> {
        Ok(())
    }
}

fn exists(
    store: &Store,
    tree: &'static str,
    tenant: &str,
    name: &str,
    what: &str,
) -> Result<(), ApiError> {
    if store.contains(tree, &format!("{tenant}/{name}"))? {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{what} {name} does not exist in tenant {tenant}"),
        ))
    }
}

impl Stored for Tenant {
    const ONE: &'static str = "tenant";
    const TREE: &'static str = trees::TENANTS;
    const PARENTS: &'static [&'static str] = &[];
    const WRITE: Action = Action::ManageTenants;
    fn in_use(store: &Store, key: &str, _: &str, _: &str) -> Result<Option<String>, ApiError> {
        for tree in [trees::SITES, trees::MACHINES, trees::POLICIES, trees::PLANS] {
            if store.any_with_prefix(tree, &format!("{key}/"))? {
                return Ok(Some(format!("the tenant still has {tree}")));
            }
        }
        Ok(None)
    }
}

impl Stored for Site {
    const ONE: &'static str = "site";
    const TREE: &'static str = trees::SITES;
    const PARENTS: &'static [&'static str] = &[trees::TENANTS];
    fn in_use(
        store: &Store,
        _: &str,
        tenant: &str,
        name: &str,
    ) -> Result<Option<String>, ApiError> {
        let ms: Vec<Machine> = store.list(trees::MACHINES, &format!("{tenant}/"))?;
        Ok(ms
            .iter()
            .find(|m| m.site == name)
            .map(|m| format!("machine {} is at this site", m.name)))
    }
}

impl Stored for Policy {
    const ONE: &'static str = "policy";
    const TREE: &'static str = trees::POLICIES;
    const PARENTS: &'static [&'static str] = &[trees::TENANTS];
    fn in_use(
        store: &Store,
        _: &str,
        tenant: &str,
        name: &str,
    ) -> Result<Option<String>, ApiError> {
        let ms: Vec<Machine> = store.list(trees::MACHINES, &format!("{tenant}/"))?;
        Ok(ms
            .iter()
            .find(|m| m.policy == name)
            .map(|m| format!("machine {} uses this policy", m.name)))
    }
}

impl Stored for Machine {
    const ONE: &'static str = "machine";
    const TREE: &'static str = trees::MACHINES;
    const PARENTS: &'static [&'static str] = &[trees::TENANTS];
    fn check_refs(&self, store: &Store, tenant: &str) -> Result<(), ApiError> {
        exists(store, trees::SITES, tenant, &self.site, "site")?;
        exists(store, trees::POLICIES, tenant, &self.policy, "policy")
    }
    fn in_use(
        store: &Store,
        key: &str,
        tenant: &str,
        name: &str,
    ) -> Result<Option<String>, ApiError> {
        if store.any_with_prefix(trees::DISKS, &format!("{key}/"))? {
            return Ok(Some("the machine still has disks".into()));
        }
        let plans: Vec<Plan> = store.list(trees::PLANS, &format!("{tenant}/"))?;
        Ok(plans
            .iter()
            .find(|p| p.machines().any(|m| m == name))
            .map(|p| format!("plan {} starts this machine", p.name)))
    }
}

impl Stored for Disk {
    const ONE: &'static str = "disk";
    const TREE: &'static str = trees::DISKS;
    const PARENTS: &'static [&'static str] = &[trees::TENANTS, trees::MACHINES];
    fn keep_server_fields(&mut self, old: &Self) {
        self.state = old.state;
        self.rpo_seconds = old.rpo_seconds;
        self.throughput_bytes_per_sec = old.throughput_bytes_per_sec;
        self.journal_bytes = old.journal_bytes;
        self.backlog_records = old.backlog_records;
        self.bytes_sent = old.bytes_sent;
        self.uplink_share = old.uplink_share;
    }
    /// A disk's name is its name at the process server and in the recovery repository, which
    /// the roles key by that name alone: two disks of one name, in two machines or two tenants,
    /// would share points, and a failover or a points listing of one would show the other's.
    /// So a disk name is unique on the appliance. The refusal does not say where the other is.
    /// A disk's key ends in its name (`{tenant}/{machine}/{disk}`), so the keys tell without
    /// decoding every disk (which made creating the 10,000th disk take 10,000 decodes).
    fn check_unique(&self, store: &Store) -> Result<(), ApiError> {
        let name = self.name.as_bytes();
        let taken = store.any_key(trees::DISKS, "", |k| {
            k.rsplit(|b| *b == b'/').next() == Some(name)
        })?;
        if taken {
            return Err(ApiError::conflict(format!(
                "a disk named {} exists already on this appliance (a disk's name names it at the \
                 process server and in the recovery repository, so it must be unique)",
                self.name
            )));
        }
        Ok(())
    }
}

impl Stored for Plan {
    const ONE: &'static str = "plan";
    fn content_needs(&self) -> Option<Action> {
        self.has_commands().then_some(Action::SetCommands)
    }
    const TREE: &'static str = trees::PLANS;
    const PARENTS: &'static [&'static str] = &[trees::TENANTS];
    fn check_refs(&self, store: &Store, tenant: &str) -> Result<(), ApiError> {
        self.machines()
            .try_for_each(|m| exists(store, trees::MACHINES, tenant, m, "machine"))
    }
}

/// The path's parameters in order (tenant first), each checked to be a possible name.
pub struct Segs(pub Vec<String>);

impl<S: Send + Sync> FromRequestParts<S> for Segs {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::PathRejection;
        let v = match Path::<Vec<(String, String)>>::from_request_parts(parts, s).await {
            Ok(Path(v)) => v,
            Err(PathRejection::MissingPathParams(_)) => Vec::new(),
            Err(e) => return Err(ApiError::not_found(e.body_text())),
        };
        for (k, val) in &v {
            validate::name(k, val).map_err(|e| ApiError::not_found(format!("no such {e}")))?;
        }
        Ok(Segs(v.into_iter().map(|(_, v)| v).collect()))
    }
}

/// Permission, then the parents' existence. Returns the key prefix of the collection.
fn enter<T: Stored>(
    store: &Store,
    p: &Principal,
    parents: &[String],
    write: bool,
) -> Result<String, ApiError> {
    let tenant = parents.first().map(String::as_str);
    p.may(if write { T::WRITE } else { Action::Read }, tenant)?;
    // The route decides how many parents there are; a mismatch is a bug in the route table.
    if parents.len() != T::PARENTS.len() {
        return Err(ApiError::internal(format!(
            "route for {} has the wrong parameters",
            T::KIND
        )));
    }
    for (i, (tree, name)) in T::PARENTS.iter().zip(parents).enumerate() {
        if !store.contains(tree, &parents[..=i].join("/"))? {
            let kind = tree.trim_end_matches('s');
            return Err(ApiError::not_found(format!("no {kind} {name}")));
        }
    }
    Ok(parents.iter().map(|s| format!("{s}/")).collect())
}

/// Split item segments into parents and the object's name.
fn item(segs: &[String]) -> Result<(&[String], &str), ApiError> {
    match segs.split_last() {
        Some((name, parents)) => Ok((parents, name)),
        None => Err(ApiError::not_found("no object named")),
    }
}

/// The tenant of an item path: the first parent, or the tenant itself.
fn tenant_of<'a>(parents: &'a [String], name: &'a str) -> &'a str {
    parents.first().map_or(name, String::as_str)
}

pub async fn list<T: Stored>(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<Vec<T>>, ApiError> {
    let prefix = enter::<T>(&app.store, &p, &s, false)?;
    let mut all: Vec<T> = app.store.list(T::TREE, &prefix)?;
    if T::PARENTS.is_empty() {
        // Tenants themselves: a tenant's principal sees only its own.
        all.retain(|t| p.sees(t.name()));
    }
    Ok(Json(all))
}

pub async fn get_one<T: Stored>(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<T>, ApiError> {
    let (parents, name) = item(&s)?;
    p.may(Action::Read, Some(tenant_of(parents, name)))?;
    let prefix = enter::<T>(&app.store, &p, parents, false)?;
    app.store
        .get(T::TREE, &format!("{prefix}{name}"))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no {} {name}", T::ONE)))
}

pub async fn create<T: Stored>(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
    Body(obj): Body<T>,
) -> Result<(StatusCode, Json<T>), ApiError> {
    let _w = app.write.lock().await;
    p.may(T::WRITE, Some(tenant_of(&s, obj.name())))?;
    let prefix = enter::<T>(&app.store, &p, &s, true)?;
    if let Some(a) = obj.content_needs() {
        p.may(a, Some(tenant_of(&s, obj.name())))?;
    }
    obj.validate()?;
    obj.check_refs(&app.store, tenant_of(&s, obj.name()))?;
    obj.check_unique(&app.store)?;
    if !app
        .store
        .insert_new(T::TREE, &format!("{prefix}{}", obj.name()), &obj)?
    {
        return Err(ApiError::conflict(format!(
            "{} {} exists already",
            T::ONE,
            obj.name()
        )));
    }
    app.store.flush().await?;
    Ok((StatusCode::CREATED, Json(obj)))
}

pub async fn replace<T: Stored>(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
    Body(mut obj): Body<T>,
) -> Result<Json<T>, ApiError> {
    let _w = app.write.lock().await;
    let (parents, name) = item(&s)?;
    p.may(T::WRITE, Some(tenant_of(parents, name)))?;
    let prefix = enter::<T>(&app.store, &p, parents, true)?;
    if let Some(a) = obj.content_needs() {
        p.may(a, Some(tenant_of(parents, name)))?;
    }
    obj.validate()?;
    if obj.name() != name {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!(
                "name: the body names {}, the path {name} (renaming is not supported)",
                obj.name()
            ),
        ));
    }
    let key = format!("{prefix}{name}");
    let old: T = app
        .store
        .get(T::TREE, &key)?
        .ok_or_else(|| ApiError::not_found(format!("no {} {name}", T::ONE)))?;
    obj.check_refs(&app.store, tenant_of(parents, name))?;
    obj.keep_server_fields(&old);
    app.store.put(T::TREE, &key, &obj)?;
    app.store.flush().await?;
    Ok(Json(obj))
}

pub async fn delete<T: Stored>(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<StatusCode, ApiError> {
    let _w = app.write.lock().await;
    let (parents, name) = item(&s)?;
    let tenant = tenant_of(parents, name);
    p.may(T::WRITE, Some(tenant))?;
    let prefix = enter::<T>(&app.store, &p, parents, true)?;
    let key = format!("{prefix}{name}");
    if !app.store.contains(T::TREE, &key)? {
        return Err(ApiError::not_found(format!("no {} {name}", T::ONE)));
    }
    if let Some(why) = T::in_use(&app.store, &key, tenant, name)? {
        return Err(ApiError::conflict(format!(
            "{} {name} is in use: {why}",
            T::ONE
        )));
    }
    app.store.remove(T::TREE, &key)?;
    app.store.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}
