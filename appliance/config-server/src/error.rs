//! Error answers: every refusal is a JSON [`ErrorBody`] with a stable code, and carries its
//! message to the audit layer (as a response extension) so the audit entry says why.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_api::{ErrorBody, Invalid, Refusal};
use serde::de::DeserializeOwned;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The message of an error answer, for the audit entry.
#[derive(Clone)]
pub struct AuditDetail(pub String);

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", what)
    }
    pub fn conflict(what: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", what)
    }
    pub fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!(error = %what, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            what.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.into(),
            message: self.message.clone(),
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        r.extensions_mut().insert(AuditDetail(self.message));
        r
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", r.to_string())
    }
}

impl From<Invalid> for ApiError {
    fn from(i: Invalid) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", i.to_string())
    }
}

/// Issuing a client certificate: a request that is not a valid CSR is the caller's fault.
impl From<crate::ca::CaError> for ApiError {
    fn from(e: crate::ca::CaError) -> Self {
        match e {
            crate::ca::CaError::Csr(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "bad-csr", e.to_string())
            }
            e => Self::internal(e),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::internal(e)
    }
}

/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A JSON body whose every failure (syntax, types, size, content type) is an [`ApiError`]
/// rather than axum's plain-text rejection, so clients always get the same error shape.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // A client that trickles its body would hold a connection slot as long as it likes;
        // timing out here, before the handler starts, also means nothing has changed yet and
        // the refusal is audited like any other.
        match tokio::time::timeout(BODY_TIMEOUT, axum::Json::<T>::from_request(req, state)).await {
            Ok(Ok(axum::Json(v))) => Ok(Body(v)),
            Ok(Err(e)) => Err(rejection(e)),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            )),
        }
    }
}

fn rejection(e: JsonRejection) -> ApiError {
    let (status, code) = match &e {
        JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "malformed-json"),
        JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "wrong-type"),
        JsonRejection::MissingJsonContentType(_) => {
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not-json")
        }
        JsonRejection::BytesRejection(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            (StatusCode::PAYLOAD_TOO_LARGE, "too-large")
        }
        _ => (StatusCode::BAD_REQUEST, "bad-body"),
    };
    ApiError::new(status, code, e.body_text())
}
