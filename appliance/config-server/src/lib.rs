//! Ferry's configuration server: the control plane of DESIGN.md. It keeps the inventory
//! (tenants, sites, appliances, protected machines and their disks), replication policies and
//! recovery plans in sled, issues client certificates from the appliance CA in exchange for
//! one-time enrollment tokens, and serves one typed JSON API ([`ferry_api`]) over mutual TLS,
//! with roles and tenant isolation on every route and an audit entry for every change and
//! every refusal.
//!
//! Rooms: [`store`] (sled), [`ca`] (issuing), [`app`] (the authentication and audit gate),
//! [`objects`] (CRUD for every kind), [`enroll`], [`identities`] (issued certificates,
//! revocation, renewal), [`reports`] (audit, events, metrics),
//! [`report`] (what appliances observe), [`alerts`], [`jobs`] (failover jobs), [`system`],
//! [`network`] and [`diagnose`] (the appliance itself, for the local console),
//! [`refusals`] (rate limits for refused clients), [`routes`] (the table) and [`openapi`] (the document made from it), [`serve`] (TLS and
//! HTTP), [`client`] (for the CLI and tests).

pub mod alerts;
pub mod app;
pub mod ca;
pub mod client;
pub mod diagnose;
pub mod enroll;
pub mod error;
pub mod identities;
pub mod jobs;
pub mod network;
pub mod objects;
pub mod openapi;
pub mod refusals;
pub mod report;
pub mod reports;
pub mod roles;
pub mod routes;
pub mod serve;
pub mod store;
pub mod system;

pub use serve::{Config, Server, ServerError};
