//! The route table. Each route is registered together with its description, and the OpenAPI
//! document is generated from these descriptions, so the document cannot list a route the
//! server does not have, nor miss one it has.

use crate::app::{gate, Caller, Shared, ENROLL_PATH};
use crate::error::ApiError;
use crate::objects::{self, Stored};
use crate::{diagnose, enroll, identities, network, openapi, report, reports, system};
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use ferry_api::{
    ActionDone, Appliance, ApplianceReport, AuditEntry, ConfigRequest, CreateToken, Dashboard,
    Diagnostics, Disk, DiskReport, EnrollRequest, Enrolled, Event, Health, IssuedCertificate,
    LoggedIn, Login, Logs, Machine, Maintenance, NetworkConfig, NetworkState, PendingNetwork, Plan,
    Policy, Principal, Registered, Registration, RenewRequest, RevokeRequest, RoleConfig,
    SetPassword, Settings, SetupStatus, Site, SupportBundle, Tenant, TenantStatus, TokenCreated,
    UpdateSlot,
};
use schemars::{JsonSchema, Schema, SchemaGenerator};

/// Largest request body. The largest object, a plan of 1000 machines, is well under this;
/// anything bigger is refused before it is parsed.
pub const BODY_LIMIT: usize = 128 * 1024;

/// The most of an oversized body read (and dropped) before it is refused. A server that answers
/// and closes while the client is still sending resets the connection, and the client may see
/// the reset instead of the answer; so a body declared too large, up to this size, is read to
/// its end first (within [`DRAIN_TIME`]), and the client gets the `413`. Past it the connection
/// is closed after the answer.
const DRAIN_LIMIT: u64 = 4 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// `413 too-large` for a body whose `Content-Length` is over [`BODY_LIMIT`], before any handler
/// (bodies without a length are cut at the limit by `DefaultBodyLimit`).
async fn refuse_oversized(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(n) = declared.filter(|&n| n > BODY_LIMIT as u64) else {
        return next.run(req).await;
    };
    if n <= DRAIN_LIMIT {
        let mut body = req.into_body();
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(Ok(_)) = body.frame().await {}
        })
        .await;
    }
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("the request body is {n} bytes, over the length limit of {BODY_LIMIT}"),
    )
    .into_response()
}

pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

pub enum Answer {
    Json(SchemaFn),
    Text(&'static str),
    Empty,
}

/// What the OpenAPI document says about one route.
pub struct Op {
    pub method: Method,
    pub path: String,
    pub summary: String,
    /// Who may call it, in words.
    pub who: &'static str,
    pub request: Option<SchemaFn>,
    pub answer: Answer,
    pub ok: u16,
    pub errors: Vec<u16>,
    /// The enrollment route takes a token instead of a client certificate.
    pub token_auth: bool,
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

impl Op {
    pub(crate) fn new(method: Method, path: impl Into<String>, summary: impl Into<String>) -> Op {
        Op {
            method,
            path: path.into(),
            summary: summary.into(),
            who: "any enrolled identity (results limited to its tenant)",
            request: None,
            answer: Answer::Empty,
            ok: 200,
            // Every route: no or unknown certificate, too many refusals, a server failure.
            errors: vec![401, 429, 500],
            token_auth: false,
        }
    }
    pub(crate) fn answers<T: JsonSchema>(mut self) -> Op {
        self.answer = Answer::Json(schema::<T>);
        self
    }
    pub(crate) fn body<T: JsonSchema>(mut self) -> Op {
        self.request = Some(schema::<T>);
        self.errors.extend([400, 408, 413, 415, 422]);
        self
    }
    pub(crate) fn text(mut self, content_type: &'static str) -> Op {
        self.answer = Answer::Text(content_type);
        self
    }
    pub(crate) fn errors(mut self, e: &[u16]) -> Op {
        self.errors.extend(e);
        self.errors.sort_unstable();
        self.errors.dedup();
        self
    }
    pub(crate) fn ok(mut self, s: u16) -> Op {
        self.ok = s;
        self
    }
    pub(crate) fn who(mut self, w: &'static str) -> Op {
        self.who = w;
        self
    }
}

pub struct Api {
    router: Router<Shared>,
    pub ops: Vec<Op>,
}

impl Api {
    pub(crate) fn add<H: Handler<T, Shared>, T: 'static>(mut self, op: Op, h: H) -> Api {
        let filter = match op.method {
            Method::GET => MethodFilter::GET,
            Method::POST => MethodFilter::POST,
            Method::PUT => MethodFilter::PUT,
            _ => MethodFilter::DELETE,
        };
        // Registering a path again with another method adds the method to it.
        self.router = self.router.route(&op.path, on(filter, h));
        self.ops.push(op.errors(&[]));
        self
    }
}

fn crud<T: Stored>(api: Api, coll: &str) -> Api {
    let item = format!("{coll}/{{{}}}", T::ONE);
    let (k, one) = (T::KIND, T::ONE);
    let writer = if T::PARENTS.is_empty() {
        "provider-admin"
    } else {
        "tenant-admin of the tenant, provider-admin"
    };
    let scoped: &[u16] = if T::PARENTS.is_empty() {
        &[]
    } else {
        &[403, 404]
    };
    api.add(
        Op::new(Method::GET, coll, format!("List {k}"))
            .answers::<Vec<T>>()
            .errors(scoped),
        objects::list::<T>,
    )
    .add(
        Op::new(Method::POST, coll, format!("Create a {one}"))
            .body::<T>()
            .answers::<T>()
            .ok(201)
            .who(writer)
            .errors(&[403, 404, 409]),
        objects::create::<T>,
    )
    .add(
        Op::new(Method::GET, &item, format!("Read a {one}"))
            .answers::<T>()
            .errors(&[403, 404]),
        objects::get_one::<T>,
    )
    .add(
        Op::new(Method::PUT, &item, format!("Replace a {one}"))
            .body::<T>()
            .answers::<T>()
            .who(writer)
            .errors(&[403, 404]),
        objects::replace::<T>,
    )
    .add(
        Op::new(
            Method::DELETE,
            &item,
            format!("Delete a {one} (refused while in use)"),
        )
        .ok(204)
        .who(writer)
        .errors(&[403, 404, 409]),
        objects::delete::<T>,
    )
}

/// The appliance itself, for the local console (docs/api.md, "The appliance").
fn system_routes(api: Api) -> Api {
    let who = "provider-admin persons (the local console's identity)";
    let op =
        |m: Method, path: &str, summary: &str| Op::new(m, path, summary).who(who).errors(&[403]);
    api.add(
        op(
            Method::GET,
            "/v1/system/setup",
            "What the first-boot wizard has done",
        )
        .answers::<SetupStatus>(),
        system::setup,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/setup/done",
            "Mark the first-boot wizard done",
        )
        .ok(204),
        system::wizard_done,
    )
    .add(
        op(
            Method::PUT,
            "/v1/system/password",
            "Set or change the administrator password",
        )
        .body::<SetPassword>()
        .ok(204)
        .errors(&[409, 429]),
        system::set_password,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/login",
            "Check the administrator password (counted; locks)",
        )
        .body::<Login>()
        .answers::<LoggedIn>()
        .errors(&[409, 429]),
        system::login,
    )
    .add(
        op(
            Method::GET,
            "/v1/system/network",
            "The network: confirmed, pending, last rollback",
        )
        .answers::<NetworkState>(),
        network::state,
    )
    .add(
        op(
            Method::PUT,
            "/v1/system/network",
            "Apply a network change (rolled back unless confirmed)",
        )
        .body::<NetworkConfig>()
        .answers::<PendingNetwork>()
        .errors(&[409]),
        network::change,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/network/confirm",
            "Keep the pending network change",
        )
        .answers::<NetworkState>()
        .errors(&[409]),
        network::confirm,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/network/revert",
            "Roll the pending network change back now",
        )
        .answers::<NetworkState>()
        .errors(&[409]),
        network::revert,
    )
    .add(
        op(
            Method::PUT,
            "/v1/system/settings",
            "Host name, time servers, HTTP proxy",
        )
        .body::<Settings>()
        .answers::<Settings>(),
        system::put_settings,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/registration",
            "Register with the provider using a key",
        )
        .body::<Registration>()
        .answers::<Registered>()
        .errors(&[502]),
        system::register,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/maintenance",
            "Restart services, reboot, shut down, factory reset",
        )
        .body::<Maintenance>()
        .answers::<ActionDone>()
        .errors(&[501]),
        system::maintenance,
    )
    .add(
        op(
            Method::PUT,
            "/v1/system/update-slot",
            "Choose the update slot for the next boot",
        )
        .body::<UpdateSlot>()
        .answers::<ActionDone>()
        .errors(&[501]),
        system::update_slot,
    )
    .add(
        op(
            Method::GET,
            "/v1/system/dashboard",
            "Disks, cache, alerts, recovery site",
        )
        .answers::<Dashboard>(),
        diagnose::dashboard,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/diagnostics",
            "Reachability and TLS checks",
        )
        .answers::<Diagnostics>(),
        diagnose::diagnostics,
    )
    .add(
        op(
            Method::GET,
            "/v1/system/logs",
            "Recent log lines (secrets removed)",
        )
        .answers::<Logs>(),
        diagnose::logs,
    )
    .add(
        op(
            Method::POST,
            "/v1/system/support-bundle",
            "Write a support bundle (secrets removed)",
        )
        .answers::<SupportBundle>(),
        diagnose::support_bundle,
    )
}

/// Every route of the server, with its middleware: the gate (authentication and audit) and
/// the body limit.
pub fn router(app: Shared) -> Router {
    let admins = "tenant-admin (its tenant, up to its role), provider-admin";
    let mut api = Api {
        router: Router::new(),
        ops: Vec::new(),
    };
    api = api
        .add(
            Op::new(Method::GET, "/healthz", "Health").answers::<Health>(),
            reports::healthz,
        )
        .add(
            Op::new(Method::GET, "/metrics", "Prometheus metrics")
                .text("text/plain")
                .who("any enrolled identity (disks of its tenant)"),
            reports::metrics,
        )
        .add(
            Op::new(Method::GET, "/v1/whoami", "The caller's principal").answers::<Principal>(),
            reports::whoami,
        )
        .add(
            Op::new(
                Method::POST,
                "/v1/tokens",
                "Create a one-time enrollment token",
            )
            .body::<CreateToken>()
            .answers::<TokenCreated>()
            .ok(201)
            .who(admins)
            .errors(&[403]),
            enroll::create_token,
        )
        .add(
            Op {
                token_auth: true,
                who: "anyone holding an unused, unexpired token",
                ..Op::new(
                    Method::POST,
                    ENROLL_PATH,
                    "Trade a token for a client certificate",
                )
                .body::<EnrollRequest>()
                .answers::<Enrolled>()
                .ok(201)
            },
            enroll::enroll,
        )
        .add(
            Op::new(
                Method::GET,
                "/v1/certificates",
                "Issued client certificates: whom each stands for, expiry, revocation",
            )
            .answers::<Vec<IssuedCertificate>>()
            .who("tenant-admin (its tenant's identities), provider-admin")
            .errors(&[403]),
            identities::list,
        )
        .add(
            Op::new(
                Method::POST,
                "/v1/certificates/revoke",
                "Revoke a certificate (by SHA-256) or an identity's certificates (by name)",
            )
            .body::<RevokeRequest>()
            .answers::<Vec<IssuedCertificate>>()
            .who(admins)
            .errors(&[403, 404, 409]),
            identities::revoke_route,
        )
        .add(
            Op::new(
                Method::POST,
                "/v1/self/renew",
                "A fresh certificate for the caller's identity (the old one is revoked when the new one is first used)",
            )
            .body::<RenewRequest>()
            .answers::<Enrolled>()
            .ok(201)
            .who("any enrolled identity, with its valid certificate"),
            identities::renew,
        )
        .add(
            Op::new(Method::GET, "/v1/appliances", "Enrolled appliances")
                .answers::<Vec<Appliance>>(),
            reports::appliances,
        )
        .add(
            Op::new(
                Method::GET,
                "/v1/audit",
                "The newest audit entries (?limit=N, at most 1000)",
            )
            .answers::<Vec<AuditEntry>>()
            .who(admins)
            .errors(&[400, 403]),
            reports::audit,
        )
        .add(
            Op::new(
                Method::GET,
                "/v1/events",
                "The newest events and alerts (?limit=N)",
            )
            .answers::<Vec<Event>>()
            .errors(&[400]),
            reports::events,
        );
    api = crud::<Tenant>(api, "/v1/tenants");
    api = api.add(
        Op::new(
            Method::GET,
            "/v1/tenants/{tenant}/status",
            "A tenant at a glance: machines, disks (state, RPO), plans (phase), active alerts",
        )
        .answers::<TenantStatus>()
        .errors(&[403, 404]),
        reports::tenant_status,
    );
    api = crud::<Site>(api, "/v1/tenants/{tenant}/sites");
    api = crud::<Policy>(api, "/v1/tenants/{tenant}/policies");
    api = crud::<Machine>(api, "/v1/tenants/{tenant}/machines");
    api = crud::<Disk>(api, "/v1/tenants/{tenant}/machines/{machine}/disks");
    api = crud::<Plan>(api, "/v1/tenants/{tenant}/plans");
    api = crate::jobs::routes::add(api);
    api = api
        .add(
            Op::new(Method::GET, "/v1/alerts", "Active alerts").answers::<Vec<Event>>(),
            crate::alerts::list,
        )
        .add(
            Op::new(
                Method::PUT,
                "/v1/appliances/{appliance}/report",
                "An appliance reports its cache and upload backlog",
            )
            .body::<ApplianceReport>()
            .answers::<ApplianceReport>()
            .who("the appliance itself, provider-admin")
            .errors(&[403, 404]),
            crate::alerts::report,
        );
    api = api.add(
        Op::new(
            Method::PUT,
            "/v1/tenants/{tenant}/machines/{machine}/disks/{disk}/report",
            "Report a disk's state and RPO",
        )
        .body::<DiskReport>()
        .answers::<Disk>()
        .who("appliances of the tenant, provider-admin")
        .errors(&[403, 404]),
        report::disk,
    );
    api = api.add(
        Op::new(
            Method::POST,
            crate::app::SELF_CONFIG_PATH,
            "A process server's or master target's configuration (a master target reports its address)",
        )
        .body::<ConfigRequest>()
        .answers::<RoleConfig>()
        .who("the appliance itself (enrolled for a tenant)")
        .errors(&[403, 409]),
        crate::roles::config,
    );
    api = system_routes(api);

    let doc_op = Op::new(Method::GET, "/openapi.json", "This document");
    api.ops.push(doc_op);
    let doc = std::sync::Arc::new(openapi::document(&api.ops));
    let doc_op = api.ops.pop().expect("pushed above");
    api = api.add(doc_op, move |Caller(_): Caller| async move {
        Json(doc.as_ref().clone())
    });

    api.router
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app)
}
