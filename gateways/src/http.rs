//! The HTTP adapter (`hono-http`): translates Hono's HTTP API into pipeline uploads and the
//! pipeline's errors into Hono's status codes; `hono-ttd` long polls that answer with a
//! command, command responses on `/command/res`, CORS pre-flight for browser devices.

use crate::commands::{CommandDelivery, CommandHub, upload_with_ttd};
use crate::metrics;
use crate::pipeline::{
    AdapterType, DeviceResponse, Endpoint, IngestPipeline, Origin, Qos, Refusal, Upload,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use base64::Engine;
use ferrule_schemas::headers as h;
use ferrule_telemetry::TraceContext;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use tower_http::cors::CorsLayer;

const ADAPTER: AdapterType = AdapterType::Http;

/// The TLS peer of an HTTPS request; absent on plain HTTP.
type Peer = Option<axum::Extension<axum::extract::ConnectInfo<crate::tls::TlsPeer>>>;

fn cert(peer: Peer) -> Option<Arc<Vec<u8>>> {
    peer.and_then(|p| p.0.0.client_cert)
}

/// The `[gateway.http]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Where the plain HTTP endpoint listens.
    pub bind: SocketAddr,
    /// Where HTTPS listens when `gateway.tls` names a certificate.
    pub tls_bind: SocketAddr,
    /// Realm named in `WWW-Authenticate` on 401.
    pub realm: String,
    /// Longest `hono-ttd` honoured when the tenant sets no `max-ttd` (seconds).
    pub max_ttd_secs: i64,
    /// Idle timeout of long polls (seconds); a ttd is capped at 80 % of it.
    pub idle_timeout_secs: i64,
    /// `false` refuses unauthenticated devices (401) whatever a tenant allows; `true` leaves
    /// it to the tenant's `hono-http` entry (`device-authentication-required`).
    pub allow_unauthenticated: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_bind: SocketAddr::from(([127, 0, 0, 1], 8443)),
            realm: "Hono".into(),
            max_ttd_secs: 60,
            idle_timeout_secs: 75,
            allow_unauthenticated: true,
        }
    }
}

struct Adapter {
    pipeline: IngestPipeline,
    /// Commands for long polls and command responses; `None` runs uploads only.
    hub: Option<CommandHub>,
    cfg: std::sync::Arc<HttpConfig>,
}

/// The adapter's routes.
pub fn router(pipeline: IngestPipeline, hub: Option<CommandHub>, cfg: HttpConfig) -> Router {
    let limit = pipeline.max_payload_size();
    let state = Adapter {
        pipeline,
        hub,
        cfg: std::sync::Arc::new(cfg),
    };
    Router::new()
        .route(
            "/telemetry",
            post(|s, t, h, u, b| own(s, t, h, u, b, Endpoint::Telemetry)),
        )
        .route(
            "/event",
            post(|s, t, h, u, b| own(s, t, h, u, b, Endpoint::Event)),
        )
        .route(
            "/telemetry/{tenant}/{device}",
            put(|s, t, p, h, u, b| addressed(s, t, p, h, u, b, Endpoint::Telemetry)),
        )
        .route(
            "/event/{tenant}/{device}",
            put(|s, t, p, h, u, b| addressed(s, t, p, h, u, b, Endpoint::Event)),
        )
        .route(
            "/telemetry//{device}",
            put(|s, t, p, h, u, b| gateway(s, t, p, h, u, b, Endpoint::Telemetry)),
        )
        .route(
            "/event//{device}",
            put(|s, t, p, h, u, b| gateway(s, t, p, h, u, b, Endpoint::Event)),
        )
        .route("/command/res/{req_id}", post(own_response))
        .route(
            "/command/res/{tenant}/{device}/{req_id}",
            put(addressed_response),
        )
        .route("/command/res//{device}/{req_id}", put(gateway_response))
        // A body over the limit is cut off here already; the pipeline checks again.
        .layer(DefaultBodyLimit::max(limit))
        .layer(cors())
        .with_state(Arc::new(state))
}

/// `POST /telemetry` and `POST /event`: an authenticated device sends its own data.
async fn own(
    State(a): State<Arc<Adapter>>,
    peer: Peer,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    handle(&a, cert(peer), &headers, &uri, body, endpoint, None, true).await
}

/// `PUT /{endpoint}/{tenant}/{device}`: a gateway acting for a device, or an unauthenticated
/// device where the tenant allows it.
async fn addressed(
    State(a): State<Arc<Adapter>>,
    peer: Peer,
    Path((tenant, device)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    handle(
        &a,
        cert(peer),
        &headers,
        &uri,
        body,
        endpoint,
        Some((tenant, device)),
        false,
    )
    .await
}

/// `PUT /{endpoint}//{device}`: a gateway acting for a device of its own tenant.
async fn gateway(
    State(a): State<Arc<Adapter>>,
    peer: Peer,
    Path(device): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    handle(
        &a,
        cert(peer),
        &headers,
        &uri,
        body,
        endpoint,
        Some((String::new(), device)),
        true,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn handle(
    a: &Adapter,
    client_cert: Option<Arc<Vec<u8>>>,
    headers: &HeaderMap,
    uri: &Uri,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    target: Option<(String, String)>,
    auth_required: bool,
) -> Response {
    match upload(
        a,
        client_cert,
        headers,
        uri,
        body,
        endpoint,
        target,
        auth_required,
    )
    .await
    {
        Ok(None) => StatusCode::ACCEPTED.into_response(),
        Ok(Some((command, for_gateway))) => command_response(command, for_gateway),
        Err(e) => error_response(&a.cfg, e),
    }
}

/// The device's trace context, if its headers carry a readable one.
fn trace_of(headers: &HeaderMap) -> Option<TraceContext> {
    let text = |name| header_str(headers, name).ok().flatten();
    TraceContext::of(text(h::TRACEPARENT), text(h::TRACESTATE))
}

/// 200 carrying a command (Hono's HTTP adapter): name, request id, target device (for
/// gateways), payload.
fn command_response(cmd: CommandDelivery, for_gateway: bool) -> Response {
    let mut resp = (StatusCode::OK, cmd.payload).into_response();
    let h = resp.headers_mut();
    h.remove(header::CONTENT_TYPE);
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set("hono-command", &cmd.subject);
    if let Some(id) = &cmd.request_id {
        set("hono-cmd-req-id", id);
    }
    if for_gateway {
        set("hono-cmd-target-device", &cmd.device_id);
    }
    if let Some(ct) = &cmd.content_type {
        set(header::CONTENT_TYPE.as_str(), ct);
    }
    resp
}

/// Who sent a request: a client certificate first, then Basic credentials (Hono's order).
async fn origin(
    a: &Adapter,
    client_cert: Option<Arc<Vec<u8>>>,
    headers: &HeaderMap,
    target: Option<&(String, String)>,
    auth_required: bool,
) -> Result<Origin, Refusal> {
    Ok(match (client_cert, basic_credentials(headers)?) {
        (Some(der), _) => {
            Origin::Device(Arc::new(a.pipeline.authenticate_certificate(&der).await?))
        }
        (None, Some((user, password))) => Origin::Device(Arc::new(
            a.pipeline
                .authenticate(&user, password.as_bytes(), target)
                .await?,
        )),
        (None, None) if auth_required => {
            return Err(Refusal::unauthenticated("credentials required"));
        }
        (None, None) => Origin::Anonymous,
    })
}

/// Uploads the message; with a `hono-ttd` the request then waits for a command, which is
/// returned with whether its target device must be named (a gateway is answered).
#[allow(clippy::too_many_arguments)]
async fn upload(
    a: &Adapter,
    client_cert: Option<Arc<Vec<u8>>>,
    headers: &HeaderMap,
    uri: &Uri,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
    target: Option<(String, String)>,
    auth_required: bool,
) -> Result<Option<(CommandDelivery, bool)>, Refusal> {
    let since = a.pipeline.tracer().is_on().then(std::time::SystemTime::now);
    // What is refused here, before the pipeline (body, credentials), is traced too.
    let refused = |e: Refusal| {
        if let Some(since) = since {
            let trace = trace_of(headers);
            a.pipeline
                .trace_refusal(ADAPTER, endpoint, trace.as_ref(), since, &e);
        }
        e
    };
    let body = body_or_error(a, body).map_err(refused)?;
    let origin = origin(a, client_cert, headers, target.as_ref(), auth_required)
        .await
        .map_err(refused)?;
    let query = uri.query().unwrap_or("");
    let qos = match header_str(headers, "qos-level")? {
        None | Some("0") => Qos::AtMostOnce,
        Some("1") => Qos::AtLeastOnce,
        Some(other) => {
            return Err(Refusal::malformed(format!(
                "unsupported QoS-Level `{other}`"
            )));
        }
    };
    let qos = if endpoint == Endpoint::Event && header_str(headers, "qos-level")?.is_none() {
        Qos::AtLeastOnce
    } else {
        qos
    };
    let ttl_secs = number_param(headers, query, "hono-ttl")?;
    // Hono's long-poll rule: the request, capped by 80 % of the idle timeout here and by the
    // tenant's max-ttd (or the default) in `upload_with_ttd`; 0 or less means no long poll.
    let requested = number_param(headers, query, "hono-ttd")?
        .map(|t| t.min(a.cfg.idle_timeout_secs * 80 / 100));
    let up = Upload {
        adapter: ADAPTER,
        endpoint,
        qos,
        origin,
        target,
        content_type: header_str(headers, header::CONTENT_TYPE.as_str())?.map(str::to_owned),
        payload: body,
        ttl_secs,
        ttd_secs: None,
        orig_address: uri.path().to_owned(),
        retain: false,
        trace: TraceContext::of(
            header_str(headers, h::TRACEPARENT)?,
            header_str(headers, h::TRACESTATE)?,
        ),
        received: since,
        notification: false,
    };
    let polling = upload_with_ttd(
        &a.pipeline,
        a.hub.as_ref(),
        up,
        requested,
        a.cfg.max_ttd_secs,
    )
    .await?;
    // A failed upload returned above, and ended its poll.
    match polling {
        Some(polling) => Ok(polling.wait().await),
        None => Ok(None),
    }
}

fn body_or_error(a: &Adapter, body: Result<Bytes, BytesRejection>) -> Result<Bytes, Refusal> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Refusal::payload_too_large(a.pipeline.max_payload_size())
        } else {
            Refusal::malformed(r.body_text())
        }
    })
}

/// `POST /command/res/{reqId}`: a device answers a command it received.
async fn own_response(
    State(a): State<Arc<Adapter>>,
    peer: Peer,
    Path(req_id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(&a, cert(peer), &headers, &uri, body, None, req_id, true).await
}

/// `PUT /command/res/{tenant}/{device}/{reqId}`: an unauthenticated device, or a gateway
/// answering for a device.
async fn addressed_response(
    State(a): State<Arc<Adapter>>,
    peer: Peer,
    Path((tenant, device, req_id)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let target = Some((tenant, device));
    respond(&a, cert(peer), &headers, &uri, body, target, req_id, false).await
}

/// `PUT /command/res//{device}/{reqId}`: a gateway answering for a device of its tenant.
async fn gateway_response(
    State(a): State<Arc<Adapter>>,
    peer: Peer,
    Path((device, req_id)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let target = Some((String::new(), device));
    respond(&a, cert(peer), &headers, &uri, body, target, req_id, true).await
}

#[allow(clippy::too_many_arguments)]
async fn respond(
    a: &Adapter,
    client_cert: Option<Arc<Vec<u8>>>,
    headers: &HeaderMap,
    uri: &Uri,
    body: Result<Bytes, BytesRejection>,
    target: Option<(String, String)>,
    request_id: String,
    auth_required: bool,
) -> Response {
    let result = async {
        let body = body_or_error(a, body)?;
        let origin = origin(a, client_cert, headers, target.as_ref(), auth_required).await?;
        let status = number_param(headers, uri.query().unwrap_or(""), "hono-cmd-status")?
            .ok_or_else(|| Refusal::malformed("`hono-cmd-status` is required"))?;
        let status = u16::try_from(status)
            .map_err(|_| Refusal::malformed(format!("invalid status {status}")))?;
        let hub = crate::commands::hub(a.hub.as_ref())?;
        let response = DeviceResponse {
            adapter: ADAPTER,
            origin,
            target,
            request_id,
            status,
            content_type: header_str(headers, header::CONTENT_TYPE.as_str())?.map(str::to_owned),
            payload: body.to_vec(),
        };
        hub.accept_response(&a.pipeline, response).await
    }
    .await;
    match result {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(e) => error_response(&a.cfg, e),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Refusal> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::trim)
                .map_err(|_| Refusal::malformed(format!("header `{name}` is not text")))
        })
        .transpose()
}

/// A numeric Hono parameter, from the header or else the query string.
fn number_param(headers: &HeaderMap, query: &str, name: &str) -> Result<Option<i64>, Refusal> {
    let raw = match header_str(headers, name)? {
        Some(v) => Some(v.to_owned()),
        None => query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        }),
    };
    raw.map(|v| {
        v.parse::<i64>()
            .map_err(|_| Refusal::malformed(format!("`{name}` must be an integer")))
    })
    .transpose()
}

/// `Authorization: Basic base64(authId@tenant:password)`, split at the first `:`.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, Refusal> {
    let Some(value) = header_str(headers, header::AUTHORIZATION.as_str())? else {
        return Ok(None);
    };
    let bad = || Refusal::unauthenticated("malformed Basic credentials");
    let (scheme, encoded) = value.split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Refusal::unauthenticated(
            "only Basic authentication is supported",
        ));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, password) = text.split_once(':').ok_or_else(bad)?;
    Ok(Some((user.to_owned(), password.to_owned())))
}

/// The one place a refusal becomes an HTTP answer: the status from the reason table
/// (`refusal.rs`), counted in `ferrule_gateway_rejected_total`.
fn error_response(cfg: &HttpConfig, e: Refusal) -> Response {
    metrics::rejected(ADAPTER.name(), e.label());
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, e.to_string()).into_response();
    if status == StatusCode::UNAUTHORIZED
        && let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", cfg.realm))
    {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

const ALLOWED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "qos-level",
    "hono-ttd",
    "hono-ttl",
    "hono-cmd-status",
    "traceparent",
    "tracestate",
];
const EXPOSED_HEADERS: &[&str] = &["hono-command", "hono-cmd-req-id", "hono-cmd-target-device"];

/// Answers CORS pre-flight requests for the upload and response resources and marks every
/// answer as readable from any origin, with the headers a browser-based device reads.
fn cors() -> CorsLayer {
    let names = |list: &[&'static str]| {
        list.iter()
            .map(|n| HeaderName::from_static(n))
            .collect::<Vec<_>>()
    };
    CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::POST, Method::PUT, Method::OPTIONS])
        .allow_headers(names(ALLOWED_HEADERS))
        .expose_headers(names(EXPOSED_HEADERS))
        .max_age(std::time::Duration::from_secs(86_400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_split_at_first_colon() {
        let mut h = HeaderMap::new();
        let enc = base64::engine::general_purpose::STANDARD.encode("dev@tenant:pa:ss");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {enc}").parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&h).unwrap(),
            Some(("dev@tenant".to_owned(), "pa:ss".to_owned()))
        );
        h.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert!(basic_credentials(&h).is_err());
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(basic_credentials(&h).is_err());
        assert_eq!(basic_credentials(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn numeric_parameters_from_header_or_query() {
        let mut h = HeaderMap::new();
        assert_eq!(
            number_param(&h, "hono-ttd=10&x=1", "hono-ttd").unwrap(),
            Some(10)
        );
        h.insert("hono-ttd", "20".parse().unwrap());
        assert_eq!(
            number_param(&h, "hono-ttd=10", "hono-ttd").unwrap(),
            Some(20)
        );
        assert!(number_param(&h, "", "hono-ttl").unwrap().is_none());
        h.insert("hono-ttl", "soon".parse().unwrap());
        assert!(number_param(&h, "", "hono-ttl").is_err());
    }
}
