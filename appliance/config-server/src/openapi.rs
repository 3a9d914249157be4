//! The OpenAPI 3.1 document, generated from the route table ([`crate::routes`]) and the types
//! of `ferry-api` (their JSON Schemas come from schemars), so it follows the code by
//! construction.

use crate::routes::{Answer, Op};
use ferry_api::ErrorBody;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

fn status_text(s: u16) -> &'static str {
    match s {
        200 => "OK",
        201 => "Created",
        204 => "Deleted",
        400 => "Malformed request (JSON syntax, query)",
        401 => "No client certificate, an unknown one, or a bad, used or expired token",
        403 => "The caller's role or tenant does not allow this",
        404 => "No such object (or parent)",
        408 => "The body did not arrive in time",
        409 => "Exists already, or still in use",
        413 => "Body larger than the limit",
        415 => "Body is not JSON",
        422 => "Well-formed JSON with wrong types or invalid values",
        429 => "Too many refused requests from this client (too-many-refusals, with Retry-After), or locked out after too many wrong passwords",
        501 => "No command is configured for this action on this appliance",
        502 => "The provider refused or could not be reached",
        500 => "Server failure",
        _ => "Other",
    }
}

/// The `{name}` parameters of a path, in order.
fn params(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .collect()
}

pub fn document(ops: &[Op]) -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let error = g.subschema_for::<ErrorBody>().to_value();
    let mut paths = Map::new();
    for op in ops {
        let mut responses = Map::new();
        let ok_content = match &op.answer {
            Answer::Json(f) => json!({"application/json": {"schema": f(&mut g).to_value()}}),
            Answer::Text(t) => json!({ *t: {"schema": {"type": "string"}}}),
            Answer::Empty => Value::Null,
        };
        let mut ok = json!({"description": status_text(op.ok)});
        if !ok_content.is_null() {
            ok["content"] = ok_content;
        }
        responses.insert(op.ok.to_string(), ok);
        for e in &op.errors {
            responses.insert(
                e.to_string(),
                json!({"description": status_text(*e),
                       "content": {"application/json": {"schema": error.clone()}}}),
            );
        }
        let mut o = json!({
            "operationId": format!("{}{}", op.method.as_str().to_lowercase(),
                op.path.replace(['/', '{', '}'], "_")),
            "summary": op.summary,
            "description": format!("Who may call: {}.", op.who),
            "parameters": params(&op.path).iter().map(|p| json!({
                "name": p, "in": "path", "required": true,
                "schema": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"}
            })).collect::<Vec<_>>(),
            "responses": responses,
        });
        if op.token_auth {
            o["security"] = json!([]);
        }
        if let Some(f) = op.request {
            o["requestBody"] = json!({"required": true,
                "content": {"application/json": {"schema": f(&mut g).to_value()}}});
        }
        let entry = paths.entry(op.path.clone()).or_insert_with(|| json!({}));
        entry[op.method.as_str().to_lowercase()] = o;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Ferry configuration server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Inventory, policies, recovery plans, enrollment and audit. Every \
                call needs a client certificate issued by the appliance CA, except enrollment, \
                which takes a one-time token. See docs/api.md."
        },
        "components": {
            "schemas": g.take_definitions(true),
            "securitySchemes": {"mutualTLS": {"type": "mutualTLS"}}
        },
        "security": [{"mutualTLS": []}],
        "paths": paths,
    })
}
